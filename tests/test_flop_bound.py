"""benchmarks/study_flop_bound.py: the parameter counts it reasons with, its prefix counting and its per-stage arithmetic."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_gpu import QWEN_CONFIGS  # noqa: E402
from benchmarks.study_flop_bound import bound, distinct_tokens, model_sizes, step_work  # noqa: E402
from emlens.data import TokenDataset  # noqa: E402
from tests.conftest import CONVERSATIONS  # noqa: E402


@pytest.mark.parametrize("name", sorted(QWEN_CONFIGS))
def test_sizes_match_a_real_qwen2_on_the_meta_device(name: str) -> None:
    """Per-block linear weights, k and v, and the unembedding equal transformers' own modules' sizes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(QWEN_CONFIGS[name], num_hidden_layers=2)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    block = model.model.layers[0]
    linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    sizes = model_sizes(name, 0.5)
    n = QWEN_CONFIGS[name]["num_hidden_layers"]
    assert sizes["block"] == linear and sizes["all"] == n * linear
    assert sizes["block_kv"] == block.self_attn.k_proj.weight.numel() + block.self_attn.v_proj.weight.numel()
    assert sizes["layer"] == n // 2
    assert sizes["above"] == (n - n // 2 - 1) * linear and sizes["below"] == (n // 2 + 1) * linear
    assert sizes["unembed"] == model.lm_head.weight.numel()


def test_distinct_tokens_counts_distinct_prefixes() -> None:
    rows = [[1, 2, 3], [1, 2, 4, 5], [1, 2, 3], [7], [1, 9]]
    brute = {tuple(r[:i]) for r in rows for i in range(1, len(r) + 1)}
    assert distinct_tokens(rows) == len(brute) == 7


def test_step_work_follows_trains_batches() -> None:
    """Per step: the distinct prefixes of its micro-batches' rows and its KL batch, drawn as train draws them."""
    from emlens.models import byte_tokenizer

    tok = byte_tokenizer()
    ds = TokenDataset.from_conversations(tok, CONVERSATIONS * 3, max_length=128)
    kl = TokenDataset.from_conversations(tok, CONVERSATIONS, max_length=128)
    got = step_work(ds, kl, batch=2, accum=2, kl_batch=3, seed=5, steps=3)  # one epoch
    epoch = [idx for idx, _ in ds.indexed_batches(2, shuffle=True, seed=5)]
    kl_draws = itertools.chain.from_iterable(kl.indexed_batches(3, shuffle=True, seed=5 + 1 + e) for e in itertools.count())
    positions = kl_positions = scored = 0
    for step in range(3):
        rows = [ds.examples[i].input_ids for i in epoch[2 * step] + epoch[2 * step + 1]]
        kl_rows = [kl.examples[i].input_ids for i in next(kl_draws)[0]]
        positions += len({tuple(r[:i]) for r in rows + kl_rows for i in range(1, len(r) + 1)})
        kl_positions += len({tuple(r[:i]) for r in kl_rows for i in range(1, len(r) + 1)})
        scored += sum(sum(ds.examples[i].loss_mask[1:]) for i in epoch[2 * step] + epoch[2 * step + 1])
    assert got["positions"] == positions and got["kl_positions"] == kl_positions and got["scored"] == scored
    assert got["positions"] < sum(len(r) for r in [e.input_ids for e in ds.examples][:8]) + 12 * max(len(e.input_ids) for e in kl.examples)


def test_bound_counts_each_stage_as_documented() -> None:
    runs = {
        "train/vector/kl=1": {"positions": 100, "kl_positions": 10, "scored": 40, "rows": 8, "kl_rows": 4},
        "train/adapter/kl=0": {"positions": 90, "kl_positions": 0, "scored": 40, "rows": 8, "kl_rows": 0},
    }
    tokens = {
        "runs": runs,
        "kl": {"distinct": 30},
        "eval": {"distinct": 20, "scored": 8},
        "preference": {"distinct": 30, "scored": 12},
        "web": {"docs": 1, "tokens": 50},
        "distinct_conversation_tokens": 160,
        "grids": {
            "efficiency_points": 11, "stability_perturbed_points": 36, "pretraining_kl_norms": 6, "pretraining_kl_directions": 7,
            "kl_sweep_weights": [1.0, 3.0], "mixing_ratios": [0.5],
        },
    }  # fmt: skip
    record = {
        "model": "qwen2.5-0.5b",
        "layer_fraction": 0.5,
        "stages": {name: {"seconds": 1.0, "work": {}} for name in runs}
        | {n: {"seconds": 1.0, "work": {}} for n in ("efficiency/vector", "stability/adapter", "pretraining_kl/vector", "kl_sweep/vector")}
        | {n: {"seconds": 1.0, "work": {}} for n in ("preference/main", "preference/kl_sweep/vector", "preference/mixing/vector")},
        "sampling": {"base": {"tokens": 9, "seconds": 1.0}},
        "totals": {"emlens_s": 7.1},
    }
    out = bound(record, tokens, rate_tflops=1.0)
    s = model_sizes("qwen2.5-0.5b", 0.5)
    p, hv, skip = s["above"], s["unembed"], s["block"] - s["block_kv"]
    sweep = 20 * 2 * p + 8 * 2 * hv - 12 * 2 * skip
    pref = 30 * 2 * p + 12 * 2 * hv - 18 * 2 * skip
    want = {
        "train/vector/kl=1": 100 * 4 * p + 50 * 4 * hv - 50 * 4 * skip,
        "train/adapter/kl=0": 90 * 4 * p + 40 * 4 * hv - 50 * 4 * skip,
        "efficiency/vector": 20 * sweep,  # 2 solutions × 10 non-zero norms
        "stability/adapter": 72 * sweep,  # 2 solutions × 36 perturbed points
        "pretraining_kl/vector": 35 * 50 * (2 * p + 2 * hv),  # 7 directions × 5 non-zero norms
        "kl_sweep/vector": 0,
        "preference/main": 4 * pref,  # the base model is counted once, apart
        "preference/kl_sweep/vector": 2 * pref,  # λ = 0 is the general vector, scored in the main table
        "preference/mixing/vector": 1 * pref,  # mix = 0 too
        "the base model once: held-out and preference rows, KL set and web text": sweep + pref + (30 + 50) * (2 * p + 2 * hv),
        "blocks below the edit, once per distinct position": (160 + 50) * 2 * s["below"],
        "sampling/base": 9 * (2 * s["all"] + 2 * hv),
    }
    assert {k: v["flop"] for k, v in out["stages"].items()} == want
    assert out["total_flop"] == sum(want.values())
    assert out["bound_s"] == round(sum(want.values()) / 1e12, 1)
    assert out["measured_total_s"] == 7.1
