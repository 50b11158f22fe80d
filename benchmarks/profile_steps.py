"""Host-side profile of emlens training steps on reused caches (GPU): where the CPU time goes, and the syncs.

Training on a 14B model is fast enough on the GPU that the host can fall behind: this prints
the wall time per step, the GPU's busy share, a cProfile of the host (top functions by own
time) and every host-device synchronisation of one step with the line that caused it.

python benchmarks/profile_steps.py --model qwen2.5-14b --out steps.json
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import build_model, emlens_train, make_dataset, new_intervention, timed  # noqa: E402
from profile_one_run import busy_fraction, run_arguments  # noqa: E402


def main() -> None:
    args = run_arguments("steps.json").parse_args()
    from emlens.models import bridge_from_hf, byte_tokenizer
    from emlens.training import TrainingCaches

    hf = build_model(args.model, "cuda", torch.bfloat16)
    layer = hf.config.num_hidden_layers // 2
    data = make_dataset(hf.config.vocab_size, args.steps * args.batch, args.seq, seed=0)
    bridge = bridge_from_hf(hf, byte_tokenizer(), name=f"emlens-bench/{args.model}")
    report: dict = {"args": vars(args), "device": torch.cuda.get_device_name()}
    t0 = time.perf_counter()
    emlens_train(bridge, "steering", layer, data.subset(range(args.batch)), None, 2, args.batch)
    report["warmup_s"] = time.perf_counter() - t0
    caches = TrainingCaches.build(bridge, new_intervention(bridge, "steering", layer), data, None, progress=False)
    one = [timed(lambda: emlens_train(bridge, "steering", layer, data, None, args.steps, args.batch), "cuda")[1] for _ in range(2)]
    reused = [
        timed(lambda: emlens_train(bridge, "steering", layer, data, None, args.steps, args.batch, caches), "cuda")[1] for _ in range(3)
    ]
    report.update(one_run_s=one, reused_s=reused)
    print("one run", one, "reused", reused, flush=True)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        emlens_train(bridge, "steering", layer, data, None, args.steps, args.batch, caches)
        torch.cuda.synchronize()
    busy, span, _ = busy_fraction(prof)
    report["gpu_busy_s"], report["kernel_span_s"] = busy, span
    print(f"GPU busy {busy:.3f} s of {span:.3f} s kernel span", flush=True)

    profiler = cProfile.Profile()
    profiler.enable()
    emlens_train(bridge, "steering", layer, data, None, args.steps, args.batch, caches)
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    report["cprofile_tottime"] = text.getvalue()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumtime").print_stats(40)
    report["cprofile_cumtime"] = text.getvalue()
    print(report["cprofile_tottime"][-6000:], flush=True)

    syncs: Counter[str] = Counter()
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if "synchronizing" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "/emlens/" in f.filename or "bench" in f.filename]
            syncs[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1])] += 1
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    emlens_train(bridge, "steering", layer, data, None, 2, args.batch, caches)
    torch.cuda.set_sync_debug_mode("default")
    warnings.showwarning = original
    report["syncs_two_steps"] = dict(syncs.most_common())
    print("syncs in a 2-step run:", sum(syncs.values()))
    for where, n in syncs.most_common(25):
        print(f"  {n:4d}  {where}")
    from torch._dynamo.utils import counters

    report["compile_stats"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles")}
    print(json.dumps(report["compile_stats"], indent=1)[:3000])
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
