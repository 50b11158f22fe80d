"""Where one emlens training run spends its time (GPU): cache build, training steps, GPU idle gaps.

Same model, data and settings as bench_gpu.py's "one run" row (random Qwen2.5 config, bf16,
layer n/2, steering vector, SFT only). Prints and writes JSON with:
  - the HF+PEFT reference time and emlens' one-run time (for the speed-up),
  - TrainingCaches.build at several token budgets per forward,
  - training on reused caches, and the share of its wall time the GPU ran no kernel,
  - the top CUDA kernels of the training steps,
  - bf16 matrix-product rates at the block's shapes (to see what the token count per step allows).

python benchmarks/profile_one_run.py --model qwen2.5-14b --out profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import build_model, emlens_train, make_dataset, new_intervention, reference_peft_train, timed  # noqa: E402


def busy_fraction(prof: torch.profiler.profile) -> tuple[float, float, list[tuple[str, float, int]]]:
    """(GPU busy seconds as a union of kernel intervals, profiled wall seconds, top kernels by total time)."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    wall = (spans[-1][1] - spans[0][0]) if spans else 0.0
    totals: dict[str, list[float]] = {}
    for e in kernels:
        t = totals.setdefault(e.name[:90], [0.0, 0])
        t[0] += e.time_range.end - e.time_range.start
        t[1] += 1
    top = sorted(((k, v[0] / 1e6, int(v[1])) for k, v in totals.items()), key=lambda x: -x[1])[:25]
    return busy / 1e6, wall / 1e6, top


def matmul_rate(m: int, k: int, n: int) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * m * k * n * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def run_arguments(out: str) -> argparse.ArgumentParser:
    """The settings both profile scripts share: bench_gpu.py's one-run row (model, steps, batch, length)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-14b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default=out)
    return ap


def main() -> None:
    ap = run_arguments("profile.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from emlens.models import bridge_from_hf, byte_tokenizer
    from emlens.training import TrainingCaches

    report: dict = {"args": vars(args), "device": torch.cuda.get_device_name()}

    def save() -> None:
        Path(args.out).write_text(json.dumps(report, indent=1))

    hf = build_model(args.model, "cuda", torch.bfloat16)
    layer = hf.config.num_hidden_layers // 2
    data = make_dataset(hf.config.vocab_size, args.steps * args.batch, args.seq, seed=0)
    small = data.subset(range(args.batch))
    reference_peft_train(hf, layer, small, None, 1, args.batch, "cuda")
    ref = [timed(lambda: reference_peft_train(hf, layer, data, None, args.steps, args.batch, "cuda"), "cuda")[1] for _ in range(2)]
    report["reference_peft_s"] = ref
    print("reference", ref, flush=True)

    bridge = bridge_from_hf(hf, byte_tokenizer(), name=f"emlens-bench/{args.model}")
    t0 = time.perf_counter()
    emlens_train(bridge, "steering", layer, small, None, 2, args.batch)
    report["warmup_s"] = time.perf_counter() - t0
    one = [
        timed(lambda: emlens_train(bridge, "steering", layer, data, None, args.steps, args.batch), "cuda")[1] for _ in range(args.repeats)
    ]
    report["one_run_s"] = one
    report["speedup_one_run"] = min(ref) / min(one)
    print("one run", one, "speed-up", report["speedup_one_run"], flush=True)
    save()

    builds = {}
    for budget in (None, 4096, 8192, 16384):  # None: the training batch size, examples at a time

        def build(budget: int | None = budget) -> object:
            vec = new_intervention(bridge, "steering", layer)
            return TrainingCaches.build(bridge, vec, data, None, batch_size=args.batch, progress=False, tokens_per_forward=budget)

        builds[str(budget)] = [timed(build, "cuda")[1] for _ in range(2)]
        print("cache build, tokens per forward", budget, builds[str(budget)], flush=True)
    report["cache_build_s"] = builds
    save()

    caches = TrainingCaches.build(bridge, new_intervention(bridge, "steering", layer), data, None, progress=False)
    reused = [
        timed(lambda: emlens_train(bridge, "steering", layer, data, None, args.steps, args.batch, caches), "cuda")[1] for _ in range(2)
    ]
    report["reused_s"] = reused
    print("reused", reused, flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        emlens_train(bridge, "steering", layer, data, None, args.steps, args.batch, caches)
        torch.cuda.synchronize()
    busy, wall, top = busy_fraction(prof)
    report["profiled_train"] = {"gpu_busy_s": busy, "kernel_span_s": wall, "idle_fraction": 1 - busy / wall, "top_kernels": top}
    print("train on reused caches: busy", busy, "of", wall, flush=True)
    for name, secs, count in top[:15]:
        print(f"  {secs:8.4f} s {count:6d}  {name}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        TrainingCaches.build(bridge, new_intervention(bridge, "steering", layer), data, None, progress=False)
        torch.cuda.synchronize()
    busy, wall, top = busy_fraction(prof)
    report["profiled_build"] = {"gpu_busy_s": busy, "kernel_span_s": wall, "idle_fraction": 1 - busy / wall, "top_kernels": top}
    print("cache build: busy", busy, "of", wall, flush=True)
    save()

    d, f = hf.config.hidden_size, hf.config.intermediate_size
    tokens = sum(len(e.input_ids) for e in data.examples) // args.steps
    rates = {}
    for m in (tokens, 2 * tokens, 4 * tokens):
        rates[m] = {
            "gate_up": matmul_rate(m, d, f),
            "down": matmul_rate(m, f, d),
            "q_proj": matmul_rate(m, d, d),
            "down_T (input grad)": matmul_rate(m, d, f),
        }
    report["matmul_tflops"] = rates
    print(json.dumps(rates, indent=1))
    save()


if __name__ == "__main__":
    main()
