"""Does a failed CUDA graph capture leave the device's default RNG unusable, and what repairs it? (one H200)

A capture that fails part-way (a host sync inside it) can leave PyTorch's default CUDA generator marked as capturing:
every later random op on that device then raises "Offset increment outside graph capture encountered unexpectedly".
Each case runs in a fresh process: fail a capture, optionally try a repair, then draw random numbers on the device.

    python benchmarks/probe_failed_capture_rng.py --out $OUT/probe_failed_capture_rng.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = r"""
import json, sys, torch
repair = sys.argv[1]
torch.manual_seed(7)
x = torch.ones(4, device="cuda")
graph = torch.cuda.CUDAGraph()
stream = torch.cuda.Stream()
torch.cuda.synchronize()
failed = None
gen = torch.cuda.default_generators[0]
before = (gen.initial_seed(), gen.get_offset()) if hasattr(gen, "get_offset") else None
try:
    with torch.cuda.graph(graph):
        y = x * 2
        torch.cuda.synchronize()  # not allowed while capturing
except RuntimeError as err:
    failed = str(err).splitlines()[0][:160]
if repair == "reset":
    graph.reset()
elif repair == "del":
    del graph
elif repair == "swap_state":
    fresh = torch.Generator(device="cuda")
    fresh.manual_seed(gen.initial_seed())
    gen.graphsafe_set_state(fresh.graphsafe_get_state())
elif repair == "manual_seed":
    torch.cuda.manual_seed(gen.initial_seed())
out = {"repair": repair, "capture_failed": failed}
try:
    z = torch.randn(3, device="cuda")
    torch.cuda.synchronize()
    out["randn_after"] = "ok"
    torch.manual_seed(7)
    a = torch.randn(3, device="cuda")
    out["reseeded_equals_fresh_process_draw"] = a.tolist()
except RuntimeError as err:
    out["randn_after"] = str(err).splitlines()[0][:200]
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    results = []
    for repair in ("none", "reset", "del", "manual_seed", "swap_state"):
        run = subprocess.run([sys.executable, "-c", CASE, repair], capture_output=True, text=True, timeout=120)
        line = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else None
        results.append(json.loads(line) if line else {"repair": repair, "error": run.stderr[-800:]})
        print(json.dumps(results[-1]), flush=True)
    fresh = subprocess.run(
        [sys.executable, "-c", "import torch, json; torch.manual_seed(7); print(json.dumps(torch.randn(3, device='cuda').tolist()))"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    results.append({"repair": "no capture at all", "draw_after_manual_seed_7": json.loads(fresh.stdout.strip())})
    print(json.dumps(results[-1]))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
