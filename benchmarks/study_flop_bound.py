"""The least time the paper-scale study could take on one GPU: its matrix work at a measured matmul rate (issue 18).

``benchmarks/study_gpu.py`` times the whole study (``emlens reproduce``) on a random-init Qwen2.5-14B config. This
script estimates how fast that same work *could* run on the same GPU: it counts the multiply-adds of the study's
matrix products that an exact implementation cannot skip, and divides them by the best bf16 matmul rate measured on
the GPU (``--rate-json``, from ``--measure-rate`` on the device; the datasheet's dense peak is printed beside it).
Everything else is left out (attention's score and value products, norms, activations, rotary embeddings, softmax
over the vocabulary, the optimiser, launches, ``torch.compile``, the model build, the report), and every saving we
know of is granted, so the result is meant as a floor:

- a position shared by several rows (the same token prefix: the chat template's system turn opens every row) is
  computed once per pass, above the edit too (the edit is the same at every position, so such positions' states
  are equal): per optimiser step for training, per sweep point, once for the blocks below the edit;
- the blocks below the edit run once per distinct position of the whole study (the adapter's base ``down_proj``
  output included, so both kinds train only the blocks above);
- the base model runs once on every set (norm 0 of every sweep, the preference tables' base row, ``p_base`` of the
  KL term and of the pre-training KL); a solution two preference tables share (λ = 0 and mix = 0 are the general
  vector) is scored once; stability's ε = 0 is efficiency's point at the solution's own norm;
- the last block computes only keys and values at positions whose logits no loss reads.

What each stage still computes, per distinct position (``P``: the linear weights of the blocks above the edit,
``H·V``: the unembedding): training (and drift) a forward through the blocks above the edit (``2P``) and the
input-gradient backward back to it (``2P``: no weight gradients, the model is frozen), plus ``2·H·V`` forward and
``2·H·V`` backward at every scored position (assistant tokens) and every KL position; the sweeps and preference
tables a forward (``2P``) and the unembedding at scored positions; the pre-training KL a forward and the unembedding
at every web token, for every non-zero norm; sampling a whole-model forward per generated token (prompts not
counted). Token counts come from the benchmark's own data, rebuilt with SmolLM2's tokenizer exactly as
``study_gpu.py`` builds it and batched as ``train`` batches it, and the record's sampled tokens.

Not a proof that nothing faster exists: the rates were measured on six shapes, in 20-product bursts on random data.

    python benchmarks/study_flop_bound.py --measure-rate --out $OUT/h200_matmul_rate.json          # on the device
    python benchmarks/study_flop_bound.py --rate-json benchmarks/raw/h200_matmul_rate*.json \\
        --record benchmarks/raw/h200_study_14b_mixing.json --out benchmarks/raw/h200_study_14b_bound.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `benchmarks.*` when run as a script

DATASHEET_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the vendor's figure
# (M, K, N) of the products the rate is measured on: square ones, and the study's own shapes (a fused training
# forward of up to 4,096 tokens through Qwen2.5-14B's MLP and attention projections, and a decode step of 400 rows).
TRAIN_TOKENS = 4096  # emlens.training.TRAIN_TOKENS_PER_FORWARD: the most tokens one fused training forward holds
RATE_SHAPES = [
    (8192, 8192, 8192),
    (16384, 16384, 16384),
    (TRAIN_TOKENS, 5120, 13824),
    (TRAIN_TOKENS, 13824, 5120),
    (TRAIN_TOKENS, 5120, 5120),
    (400, 5120, 13824),
]


def measure_rate(repeats: int = 20) -> dict[str, Any]:
    """bf16 matmul rates on random data (TFLOP/s, each the mean of ``repeats`` products after 5 warm-ups)."""
    import torch

    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "repeats": repeats, "shapes": []}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for m, k, n in RATE_SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(5):
            a @ b
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
        secs = (time.perf_counter() - start) / repeats
        out["shapes"].append({"m": m, "k": k, "n": n, "ms": round(secs * 1e3, 4), "tflops": round(2 * m * k * n / secs / 1e12, 1)})
    out["best_tflops"] = max(s["tflops"] for s in out["shapes"])
    return out


def model_sizes(name: str, layer_fraction: float) -> dict[str, int]:
    from benchmarks.bench_gpu import QWEN_CONFIGS

    c = QWEN_CONFIGS[name]
    h, inter, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head
    block = h * h + 2 * h * kv + h * h + 3 * h * inter  # q, k, v, o and the MLP's three projections
    layer = int(layer_fraction * n)  # the study's edit: after block `layer` (vector), on its down_proj (adapter)
    return {
        "block": block,
        "block_kv": 2 * h * kv,  # what the last block still needs at a position whose logits nobody reads
        "blocks": n,
        "layer": layer,
        # blocks layer+1 .. n-1: the vector's edit and the adapter's alike (an adapter on down_proj adds its rank-r
        # term to a stored base output, since the blocks below, block `layer` included, run once per token)
        "above": (n - layer - 1) * block,
        "below": (layer + 1) * block,  # blocks 0 .. layer, once per distinct token (prefix) of the study
        "unembed": h * c["vocab_size"],
        "all": n * block,
    }


class Trie:
    """Distinct token prefixes of the rows added: a position shared by rows with the same prefix counts once (its
    states, above the edit too, are the same in every such row, since the edit is the same at every position)."""

    def __init__(self) -> None:
        self.root: dict[int, Any] = {}
        self.nodes = 0

    def add(self, ids: list[int]) -> None:
        node = self.root
        for t in ids:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                self.nodes += 1
            node = nxt


def distinct_tokens(rows: list[list[int]]) -> int:
    trie = Trie()
    for ids in rows:
        trie.add(ids)
    return trie.nodes


def step_work(ds: Any, kl: Any | None, batch: int, accum: int, kl_batch: int, seed: int, steps: int) -> dict[str, int]:
    """Distinct positions per optimiser step of a run on ``ds`` (its rows as ``train`` batches them, with one KL batch of
    ``kl`` per step, shuffled epoch after epoch as ``train`` documents), summed over ``steps`` steps. A run of more
    than one epoch repeats the first epoch's batches (another epoch's shuffle has alike counts)."""
    epoch = [idx for idx, _ in ds.indexed_batches(batch, shuffle=True, seed=seed)]
    chunks = [sum(epoch[i : i + accum], []) for i in range(0, len(epoch), accum)]
    kl_epochs = (kl.indexed_batches(kl_batch, shuffle=True, seed=seed + 1 + e) for e in itertools.count()) if kl is not None else None
    kl_batches = itertools.chain.from_iterable(kl_epochs) if kl_epochs is not None else None
    out = {"positions": 0, "kl_positions": 0, "scored": 0, "rows": 0, "kl_rows": 0}
    for step in range(steps):
        rows = [ds.examples[i] for i in chunks[step % len(chunks)]]
        kl_rows = [kl.examples[i] for i in next(kl_batches)[0]] if kl_batches is not None else []
        out["positions"] += distinct_tokens([e.input_ids for e in rows + kl_rows])
        out["kl_positions"] += distinct_tokens([e.input_ids for e in kl_rows])
        out["scored"] += sum(sum(e.loss_mask[1:]) for e in rows)
        out["rows"] += len(rows)
        out["kl_rows"] += len(kl_rows)
    return out


def count_tokens(args: argparse.Namespace, record: dict[str, Any]) -> dict[str, Any]:
    """What each stage must compute, counted on the benchmark's own data (built as ``study_gpu.py`` builds it, CPU and
    tokenizer only): distinct positions per step, per sweep point and over the whole study."""
    from benchmarks.study_gpu import BenchContext, load_tokenizer, parse_args, study_config
    from emlens.preference import paired_datasets

    bench = parse_args(["--device", "cpu", "--dtype", "bfloat16"] + (["--tokenizer", args.tokenizer] if args.tokenizer else []))
    tok = load_tokenizer(bench.tokenizer)
    cfg = study_config(bench, "full")
    ctx = BenchContext(
        cfg, Path("/nonexistent"), progress=False, tokenizer=tok, n_train=bench.train_rows, n_eval=bench.eval_rows,
        web_tokens=bench.web_tokens, cycle_mix_pool=bench.mix_pool == "cycled",
    )  # fmt: skip
    kl = ctx.kl_data()
    ev = ctx.eval_data()
    pref_rows: list[Any] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for domain in cfg.preference.domains or list(ctx.study.domains):
            pairs = paired_datasets(tok, domain, cfg.preference.rows, cfg.data.max_length)
            pref_rows += pairs.harmful.examples + pairs.correct.examples
    web = ctx.web_texts()
    everything = Trie()
    out: dict[str, Any] = {"train": {}, "runs": {}}
    for ratio in [0.0] + [r for r in cfg.mixing.ratios if r > 0]:
        ds = ctx.train_data(ratio)
        for e in ds.examples:
            everything.add(e.input_ids)
        out["train"][f"{ratio:g}"] = {"rows": len(ds), "tokens": sum(len(e.input_ids) for e in ds.examples), "scored": ds.n_scored_tokens}
    for e in kl.examples + ev.examples + pref_rows:
        everything.add(e.input_ids)
    kinds = {"vector": cfg.train["vector"], "adapter": cfg.train["adapter"]}
    memo: dict[tuple[str, bool, int], dict[str, int]] = {}
    for name, entry in record["stages"].items():
        if not name.startswith(("train/", "drift/")):
            continue
        kind = name.split("/")[1]
        ratio = name.split("mix=")[1] if "mix=" in name else "0"
        with_kl = entry["work"].get("kl_tokens", 0) > 0
        sec, steps = kinds[kind], entry["work"]["steps"]
        key = (ratio, with_kl, steps)
        if key not in memo:
            ds = ctx.train_data(float(ratio))
            memo[key] = step_work(ds, kl if with_kl else None, sec.batch_size, sec.grad_accum, sec.kl_batch_size, cfg.seed, steps)
        out["runs"][name] = memo[key]
    out["kl"] = {
        "rows": len(kl),
        "tokens": sum(len(e.input_ids) for e in kl.examples),
        "distinct": distinct_tokens([e.input_ids for e in kl.examples]),
    }
    out["eval"] = {"rows": len(ev), "tokens": sum(len(e.input_ids) for e in ev.examples), "scored": ev.n_scored_tokens,
                   "distinct": distinct_tokens([e.input_ids for e in ev.examples])}  # fmt: skip
    out["preference"] = {"rows": len(pref_rows), "tokens": sum(len(e.input_ids) for e in pref_rows),
                         "scored": sum(sum(e.loss_mask[1:]) for e in pref_rows), "distinct": distinct_tokens([e.input_ids for e in pref_rows])}  # fmt: skip
    out["web"] = {"docs": len(web), "tokens": sum(len(e.input_ids) for e in web.examples)}
    out["distinct_conversation_tokens"] = everything.nodes
    out["grids"] = {
        "efficiency_points": cfg.efficiency.points,
        "stability_perturbed_points": len([e for e in cfg.stability.epsilons if e > 0]) * len(cfg.stability.seeds),
        "pretraining_kl_norms": cfg.pretraining_kl.points,
        "pretraining_kl_directions": 2 + cfg.pretraining_kl.n_random,
        "kl_sweep_weights": [w for w in cfg.kl_sweep.weights if w > 0],
        "mixing_ratios": [r for r in cfg.mixing.ratios if r > 0],
    }
    return out


def bound(record: dict[str, Any], tokens: dict[str, Any], rate_tflops: float) -> dict[str, Any]:
    """Unavoidable multiply-adds per stage of the record (FLOP = 2 per multiply-add) and their time at ``rate_tflops``."""
    size = model_sizes(record["model"], record.get("layer_fraction", 0.5))
    p, hv = size["above"], size["unembed"]
    last_skip = size["block"] - size["block_kv"]  # the last block at a position whose logits nobody reads
    grids = tokens["grids"]
    stages: dict[str, dict[str, Any]] = {}
    ev, pr = tokens["eval"], tokens["preference"]
    sweep_point = ev["distinct"] * 2 * p + ev["scored"] * 2 * hv - (ev["distinct"] - ev["scored"]) * 2 * last_skip
    pref_point = pr["distinct"] * 2 * p + pr["scored"] * 2 * hv - (pr["distinct"] - pr["scored"]) * 2 * last_skip
    preference_seen = {"base"}
    for name, entry in record["stages"].items():
        kind = name.split("/")[0]
        if kind in ("train", "drift"):
            w = tokens["runs"][name]
            unread = w["positions"] - w["scored"] - w["kl_positions"]  # positions whose logits no loss reads
            flop = w["positions"] * 4 * p + (w["scored"] + w["kl_positions"]) * 4 * hv - unread * 4 * last_skip
            what = f"{w['positions']:,} distinct positions over its steps ({w['scored']:,} scored, {w['kl_positions']:,} KL)"
        elif kind == "efficiency":
            points = 2 * (grids["efficiency_points"] - 1)  # general and narrow, norm 0 (the base model) counted apart
            flop, what = points * sweep_point, f"{points} points × {ev['distinct']:,} distinct positions"
        elif kind == "stability":
            points = 2 * grids["stability_perturbed_points"]  # ε = 0 is a point efficiency already computed
            flop, what = points * sweep_point, f"{points} points × {ev['distinct']:,} distinct positions"
        elif kind == "pretraining_kl":
            points = grids["pretraining_kl_directions"] * (grids["pretraining_kl_norms"] - 1)  # norm 0 is the base
            flop = points * tokens["web"]["tokens"] * (2 * p + 2 * hv)
            what = f"{points} non-zero points × {tokens['web']['tokens']:,} web tokens"
        elif kind == "preference":
            table = name.split("/", 1)[1]
            solutions = {
                "main": ["vector/kl=0", "vector/kl=6.6", "adapter/kl=0", "adapter/kl=0.66"],
                "kl_sweep/vector": [f"vector/kl={w:g}" for w in [0.0] + grids["kl_sweep_weights"]],
                "mixing/vector": ["vector/kl=0"] + [f"vector/mix={r:g}" for r in grids["mixing_ratios"]],
            }.get(table, [])
            new = [s for s in solutions if s not in preference_seen]  # λ = 0 and mix = 0 are the general vector
            preference_seen.update(new)
            flop, what = len(new) * pref_point, f"{len(new)} solutions not scored in an earlier table"
        else:
            flop, what = 0, "no model work"
        stages[name] = {"flop": flop, "what": what, "measured_s": entry.get("seconds")}
    base_sweep = sweep_point + pref_point  # the base model on the held-out and preference rows, once for every table
    stages["the base model once: held-out and preference rows, KL set and web text"] = {
        "flop": base_sweep + (tokens["kl"]["distinct"] + tokens["web"]["tokens"]) * (2 * p + 2 * hv),
        "what": "norm 0 of every sweep, the preference tables' base row, p_base of the KL term and of the pre-training KL",
        "measured_s": None,
    }
    lower = tokens["distinct_conversation_tokens"] + tokens["web"]["tokens"]
    stages["blocks below the edit, once per distinct position"] = {
        "flop": lower * 2 * size["below"],
        "what": f"{lower:,} distinct positions of every row and document, through {size['layer'] + 1} blocks",
        "measured_s": None,  # inside the training stages' times (their cache builds)
    }
    for label, smp in record.get("sampling", {}).items():
        stages[f"sampling/{label}"] = {
            "flop": smp["tokens"] * (2 * size["all"] + 2 * hv),
            "what": f"{smp['tokens']:,} generated tokens, whole-model forward",
            "measured_s": smp.get("seconds"),
        }
    total = sum(st["flop"] for st in stages.values())
    for st in stages.values():
        st["bound_s"] = round(st["flop"] / (rate_tflops * 1e12), 1)
    return {
        "model": record["model"],
        "sizes": size,
        "rate_tflops": rate_tflops,
        "datasheet_tflops": DATASHEET_BF16_TFLOPS,
        "tokens": tokens,
        "stages": stages,
        "total_flop": total,
        "bound_s": round(total / (rate_tflops * 1e12), 1),
        "bound_at_datasheet_s": round(total / (DATASHEET_BF16_TFLOPS * 1e12), 1),
        "measured_total_s": record.get("totals", {}).get("emlens_s"),
        "target_s": 600.0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure-rate", action="store_true", help="measure bf16 matmul rates on this CUDA GPU and write them to --out")
    p.add_argument("--rate-json", nargs="+", default=None, help="--measure-rate files: the best rate in them is the bound's ceiling")
    p.add_argument("--record", default="benchmarks/raw/h200_study_14b_mixing.json", help="a study_gpu.py record")
    p.add_argument("--tokenizer", default=None, help="SmolLM2's tokenizer folder (default: the embedded default model's)")
    p.add_argument("--out", required=True, help="the JSON to write")
    args = p.parse_args(argv)
    if args.measure_rate:
        result = measure_rate()
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    if not args.rate_json:
        p.error("give --rate-json (--measure-rate files) or --measure-rate")
    rates = [json.loads(Path(f).read_text()) for f in args.rate_json]
    shapes = [s for r in rates for s in r["shapes"]]
    best = max(s["tflops"] for s in shapes)
    # the best rate on the shapes a training step multiplies (up to 4,096 tokens through the model's projections)
    study_shape = max((s["tflops"] for s in shapes if s["m"] == TRAIN_TOKENS), default=None)
    record = json.loads(Path(args.record).read_text())
    result = bound(record, count_tokens(args, record), best)
    result["rate_source"] = {"files": args.rate_json, "devices": sorted({r.get("device") for r in rates}), "shapes": shapes}
    if study_shape is not None:
        result["study_shape_tflops"] = study_shape
        result["bound_at_study_shape_s"] = round(result["total_flop"] / (study_shape * 1e12), 1)
    result["record"] = args.record
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'stage':52} {'TFLOP':>9} {'bound s':>8} {'measured s':>10}")
    for name, s in result["stages"].items():
        print(f"{name:52} {s['flop'] / 1e12:9.0f} {s['bound_s']:8.1f} {s['measured_s'] if s['measured_s'] is not None else '–':>10}")
    print(
        f"total {result['total_flop'] / 1e15:.1f} PFLOP: at least {result['bound_s']} s at {best} TFLOP/s (the best measured "
        f"matmul), {result.get('bound_at_study_shape_s')} s at {study_shape} TFLOP/s (the best at a training step's "
        f"shapes), {result['bound_at_datasheet_s']} s at the datasheet's {DATASHEET_BF16_TFLOPS:g}; "
        f"measured {result['measured_total_s']} s; target {result['target_s']:g} s"
    )


if __name__ == "__main__":
    main()
