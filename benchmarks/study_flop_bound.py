"""The least time the paper-scale study can take on one GPU: its unavoidable matrix work at a measured matmul rate (issue 18).

``benchmarks/study_gpu.py`` times the whole study (``emlens reproduce``) on a random-init Qwen2.5-14B config. This
script asks how fast that same work *could* run on the same GPU. It counts only the multiply-adds that no exact
implementation of the study can skip, and divides them by the best bf16 matmul rate measured on the GPU
(``--rate-json``, from ``--measure-rate`` on the device; the datasheet's dense peak is printed beside it). Everything
else is left out, so the result is a lower bound on wall time:

- attention's score and value products, norms, activations, rotary embeddings, softmax and log-softmax over the
  vocabulary, the optimiser, kernel launches, ``torch.compile``, the model build and the report;
- every multiply-add a cleverer implementation could share: the blocks below the intervention run once per distinct
  token of the whole study (every training set, the KL set, the held-out and preference rows), the base model's
  distribution on the KL set and the web text is counted as stored, not recomputed, and sweep points at norm 0
  (the same base model for every solution) count once.

What each stage must still compute, per token (``P``: the linear weights of the blocks above the edit, ``H·V``: the
unembedding):

- training (and drift): forward through the blocks above the edit (``2P``) and the input-gradient backward back to
  it (``2P``: no weight gradients, the model is frozen), plus ``2·H·V`` forward and ``2·H·V`` backward through the
  unembedding at every *scored* token (assistant tokens only); every KL token is scored over the whole vocabulary;
- the efficiency, stability and preference sweeps: a forward above the edit at every token (``2P``), the unembedding
  at scored tokens (``2·H·V``);
- the pre-training KL: a forward above the edit and the unembedding at every web token, for every non-zero norm;
- sampling: a whole-model forward (``2·P_all + 2·H·V``) per generated token (prompts not counted).

Token counts come from the benchmark's own data (rebuilt here with SmolLM2's tokenizer, exactly as ``study_gpu.py``
builds it) and, for the KL batches consumed and the tokens sampled, from the measured record.

    python benchmarks/study_flop_bound.py --measure-rate --out $OUT/h200_matmul_rate.json          # on the device
    python benchmarks/study_flop_bound.py --rate-json benchmarks/raw/h200_matmul_rate*.json \\
        --record benchmarks/raw/h200_study_14b_mixing.json --out benchmarks/raw/h200_study_14b_bound.json
"""

from __future__ import annotations

import argparse
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
        "blocks": n,
        "layer": layer,
        "above_vector": (n - layer - 1) * block,  # blocks layer+1 .. n-1
        "above_adapter": (n - layer - 1) * block + h * inter,  # + block `layer`'s down_proj (its input is stored)
        "below": (layer + 1) * block,  # what a stored residual after block `layer` saves, per token
        "unembed": h * c["vocab_size"],
        "all": n * block,
    }


def count_tokens(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens and scored tokens of every data set, built as ``study_gpu.py`` builds them (CPU, tokenizer only)."""
    from benchmarks.study_gpu import BenchContext, load_tokenizer, parse_args, study_config
    from emlens.preference import paired_datasets

    bench = parse_args(["--device", "cpu", "--dtype", "bfloat16"] + (["--tokenizer", args.tokenizer] if args.tokenizer else []))
    tok = load_tokenizer(bench.tokenizer)
    cfg = study_config(bench, "full")
    ctx = BenchContext(
        cfg, Path("/nonexistent"), progress=False, tokenizer=tok, n_train=bench.train_rows, n_eval=bench.eval_rows,
        web_tokens=bench.web_tokens, cycle_mix_pool=bench.mix_pool == "cycled",
    )  # fmt: skip
    out: dict[str, Any] = {"train": {}}
    distinct: set[tuple[int, ...]] = set()

    def tally(ds: Any) -> dict[str, int]:
        for e in ds.examples:
            distinct.add(tuple(e.input_ids))
        return {"rows": len(ds), "tokens": sum(len(e.input_ids) for e in ds.examples), "scored": ds.n_scored_tokens}

    for ratio in [0.0] + [r for r in cfg.mixing.ratios if r > 0]:
        out["train"][f"{ratio:g}"] = tally(ctx.train_data(ratio))
    out["kl"] = tally(ctx.kl_data())
    out["eval"] = tally(ctx.eval_data())
    pref = {"rows": 0, "tokens": 0, "scored": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for domain in cfg.preference.domains or list(ctx.study.domains):
            pairs = paired_datasets(tok, domain, cfg.preference.rows, cfg.data.max_length)
            for ds in (pairs.harmful, pairs.correct):
                for key, value in tally(ds).items():
                    pref[key] += value
    out["preference"] = pref
    web = ctx.web_texts()
    out["web"] = {"docs": len(web), "tokens": sum(len(e.input_ids) for e in web.examples)}
    out["distinct_conversation_tokens"] = sum(len(ids) for ids in distinct)
    out["grids"] = {
        "efficiency_points": cfg.efficiency.points,
        "stability_points": 1 + (len([e for e in cfg.stability.epsilons if e > 0]) * len(cfg.stability.seeds)),
        "pretraining_kl_norms": cfg.pretraining_kl.points,
        "pretraining_kl_directions": 2 + cfg.pretraining_kl.n_random,
        "kl_sweep_weights": [w for w in cfg.kl_sweep.weights if w > 0],
        "mixing_ratios": [r for r in cfg.mixing.ratios if r > 0],
    }
    return out


def bound(record: dict[str, Any], tokens: dict[str, Any], rate_tflops: float) -> dict[str, Any]:
    """Unavoidable multiply-adds per stage of the record (FLOP = 2 per multiply-add) and their time at ``rate_tflops``."""
    size = model_sizes(record["model"], record.get("layer_fraction", 0.5))
    unembed = size["unembed"]
    train = tokens["train"]
    grids = tokens["grids"]
    stages: dict[str, dict[str, Any]] = {}

    def above(stage: str) -> int:
        return size["above_adapter"] if "adapter" in stage else size["above_vector"]

    for name, entry in record["stages"].items():
        kind = name.split("/")[0]
        work = entry.get("work", {})
        p = above(name)
        if kind in ("train", "drift"):
            ratio = name.split("mix=")[1] if "mix=" in name else "0"
            data = train[ratio]
            kl_tokens = work.get("kl_tokens", 0)  # the KL batches the run consumed (measured)
            flop = data["tokens"] * 4 * p + data["scored"] * 4 * unembed + kl_tokens * (4 * p + 4 * unembed)
            what = f"{data['tokens']:,} tokens ({data['scored']:,} scored) fwd + input-grad bwd, {kl_tokens:,} KL tokens"
        elif kind == "efficiency" or kind == "stability":
            per_solution = grids["efficiency_points"] if kind == "efficiency" else grids["stability_points"]
            # general + narrow; efficiency's norm 0 is one base run, and stability's relative form needs the base loss once
            points = 2 * per_solution + (-1 if kind == "efficiency" else 1)
            ev = tokens["eval"]
            flop = points * (ev["tokens"] * 2 * p + ev["scored"] * 2 * unembed)
            what = f"{points} points × {ev['tokens']:,} tokens forward"
        elif kind == "pretraining_kl":
            points = grids["pretraining_kl_directions"] * (grids["pretraining_kl_norms"] - 1)  # norm 0 is the base
            flop = points * tokens["web"]["tokens"] * (2 * p + 2 * unembed)
            what = f"{points} non-zero points × {tokens['web']['tokens']:,} web tokens forward"
        elif kind == "preference":
            points = work.get("points", 0)  # solutions incl. the base model
            pr = tokens["preference"]
            flop = points * (pr["tokens"] * 2 * p + pr["scored"] * 2 * unembed)
            what = f"{points} solutions × {pr['tokens']:,} tokens forward"
        else:
            flop, what = 0, "no model work"
        stages[name] = {"flop": flop, "what": what, "measured_s": entry.get("seconds")}
    lower = tokens["distinct_conversation_tokens"] + tokens["web"]["tokens"]
    stages["blocks below the edit, once per distinct token"] = {
        "flop": lower * 2 * size["below"],
        "what": f"{lower:,} distinct tokens (every training set, KL, eval, preference and web row) through {size['layer'] + 1} blocks",
        "measured_s": None,  # inside the training stages' times (their cache builds)
    }
    for label, s in record.get("sampling", {}).items():
        stages[f"sampling/{label}"] = {
            "flop": s["tokens"] * (2 * size["all"] + 2 * unembed),
            "what": f"{s['tokens']:,} generated tokens, whole-model forward",
            "measured_s": s.get("seconds"),
        }
    total = sum(s["flop"] for s in stages.values())
    for s in stages.values():
        s["bound_s"] = round(s["flop"] / (rate_tflops * 1e12), 1)
    measured = record.get("totals", {}).get("emlens_s")
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
        "measured_total_s": measured,
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
    result = bound(record, count_tokens(args), best)
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
