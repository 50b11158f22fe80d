"""Where does a decoder block's time go? GEMM ceiling vs Qwen2.5-14B blocks, eager and compiled (device probe)."""

from __future__ import annotations

import json
import sys
import time

import torch

sys.path.insert(0, ".")
from benchmarks.bench_gpu import build_model  # noqa: E402


def bench(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    out = {}
    a = torch.randn(2048, 5120, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(5120, 13824, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: a @ b, 50)
    out["gemm_tflops"] = 2 * 2048 * 5120 * 13824 / t / 1e12
    x = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: x.clone(), 20)
    out["copy_GBps"] = 2 * x.numel() * 2 / t / 1e9
    print(out, flush=True)

    n_layers = 8
    hf = build_model("qwen2.5-14b", "cuda", torch.bfloat16, n_layers=n_layers)
    dec = hf.model
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(154, 257, (8,), generator=gen)
    width = int(lengths.max())
    mask = (torch.arange(width)[None] < lengths[:, None]).long().cuda()
    resid = torch.randn(8, width, 5120, device="cuda", dtype=torch.bfloat16)
    tokens = 8 * width
    per_layer_flops = 2 * sum(p.numel() for p in dec.layers[0].parameters())  # matmul forward per token

    def fwd(m):
        with torch.no_grad():
            return dec(inputs_embeds=resid, attention_mask=m, use_cache=False).last_hidden_state

    def fwd_bwd(m):
        r = resid.detach().requires_grad_(True)
        h = dec(inputs_embeds=r, attention_mask=m, use_cache=False).last_hidden_state
        h.float().square().mean().backward()
        return r.grad

    for name, fn, mult in (("fwd mask", lambda: fwd(mask), 1), ("fwd none", lambda: fwd(None), 1),
                           ("fwd+bwd mask", lambda: fwd_bwd(mask), 2), ("fwd+bwd none", lambda: fwd_bwd(None), 2)):
        t = bench(fn)
        out[name] = {"ms": round(t * 1e3, 2), "tflops": round(mult * per_layer_flops * n_layers * tokens / t / 1e12, 1)}
        print(name, out[name], flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd(mask)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70), flush=True)

    t0 = time.perf_counter()
    for layer in dec.layers:
        layer.compile()
    try:
        fwd_bwd(None)
        torch.cuda.synchronize()
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        for name, fn, mult in (("compiled fwd none", lambda: fwd(None), 1), ("compiled fwd+bwd none", lambda: fwd_bwd(None), 2),
                               ("compiled fwd+bwd mask", lambda: fwd_bwd(mask), 2)):
            t = bench(fn)
            out[name] = {"ms": round(t * 1e3, 2), "tflops": round(mult * per_layer_flops * n_layers * tokens / t / 1e12, 1)}
            print(name, out[name], flush=True)
    except Exception as exc:  # report, don't hide
        out["compile_error"] = repr(exc)[:2000]
        print("compile failed:", repr(exc)[:2000], flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
