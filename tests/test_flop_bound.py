"""benchmarks/study_flop_bound.py: the parameter counts it reasons with, and its per-stage arithmetic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_gpu import QWEN_CONFIGS  # noqa: E402
from benchmarks.study_flop_bound import bound, model_sizes  # noqa: E402


@pytest.mark.parametrize("name", sorted(QWEN_CONFIGS))
def test_sizes_match_a_real_qwen2_on_the_meta_device(name: str) -> None:
    """Per-block linear weights, the down_proj and the unembedding equal transformers' own modules' sizes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(QWEN_CONFIGS[name], num_hidden_layers=2)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    block = model.model.layers[0]
    linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    sizes = model_sizes(name, 0.5)
    n = QWEN_CONFIGS[name]["num_hidden_layers"]
    assert sizes["block"] == linear
    assert sizes["layer"] == n // 2
    assert sizes["above_vector"] == (n - n // 2 - 1) * linear
    assert sizes["above_adapter"] - sizes["above_vector"] == block.mlp.down_proj.weight.numel()
    assert sizes["unembed"] == model.lm_head.weight.numel()
    assert sizes["all"] == n * linear


def test_bound_counts_each_stage_as_documented() -> None:
    tokens = {
        "train": {"0": {"rows": 2, "tokens": 100, "scored": 40}},
        "kl": {"rows": 1, "tokens": 10, "scored": 5},
        "eval": {"rows": 1, "tokens": 20, "scored": 8},
        "preference": {"rows": 2, "tokens": 30, "scored": 12},
        "web": {"docs": 1, "tokens": 50},
        "distinct_conversation_tokens": 160,
        "grids": {"efficiency_points": 11, "stability_points": 37, "pretraining_kl_norms": 6, "pretraining_kl_directions": 7},
    }
    record = {
        "model": "qwen2.5-0.5b",
        "layer_fraction": 0.5,
        "stages": {
            "train/vector/kl=1": {"seconds": 1.0, "work": {"kl_tokens": 7}},
            "train/adapter/kl=0": {"seconds": 1.0, "work": {"kl_tokens": 0}},
            "efficiency/vector": {"seconds": 1.0, "work": {}},
            "stability/adapter": {"seconds": 1.0, "work": {}},
            "pretraining_kl/vector": {"seconds": 1.0, "work": {}},
            "preference/main": {"seconds": 1.0, "work": {"points": 5}},
            "kl_sweep/vector": {"seconds": 0.1, "work": {}},
        },
        "sampling": {"base": {"tokens": 9, "seconds": 1.0}},
        "totals": {"emlens_s": 7.1},
    }
    out = bound(record, tokens, rate_tflops=1.0)
    s = model_sizes("qwen2.5-0.5b", 0.5)
    pv, pa, hv = s["above_vector"], s["above_adapter"], s["unembed"]
    want = {
        "train/vector/kl=1": 100 * 4 * pv + 40 * 4 * hv + 7 * (4 * pv + 4 * hv),
        "train/adapter/kl=0": 100 * 4 * pa + 40 * 4 * hv,
        "efficiency/vector": 21 * (20 * 2 * pv + 8 * 2 * hv),  # 2 × 11 points, norm 0 once
        "stability/adapter": 75 * (20 * 2 * pa + 8 * 2 * hv),  # 2 × 37 points and the base loss
        "pretraining_kl/vector": 35 * 50 * (2 * pv + 2 * hv),  # 7 directions × 5 non-zero norms
        "preference/main": 5 * (30 * 2 * pv + 12 * 2 * hv),
        "kl_sweep/vector": 0,
        "blocks below the edit, once per distinct token": (160 + 50) * 2 * s["below"],
        "sampling/base": 9 * (2 * s["all"] + 2 * hv),
    }
    assert {k: v["flop"] for k, v in out["stages"].items()} == want
    assert out["total_flop"] == sum(want.values())
    assert out["bound_s"] == round(sum(want.values()) / 1e12, 1)
    assert out["measured_total_s"] == 7.1
