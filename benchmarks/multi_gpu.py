"""Show emlens training on a model split over several GPUs (transformers/accelerate device map).

Saves a randomly initialised Qwen2.5-7B-config checkpoint, loads it with emlens.load_model(...,
device_map="auto") capped so that it must span every visible GPU, and trains a steering vector
with and without the cached prefix, printing where the layers live, the losses and peak memory.
Run on a machine with 2+ GPUs: python benchmarks/multi_gpu.py --out benchmarks/multi_gpu.json
"""

import argparse
import json
import time

import torch

from benchmarks.bench_gpu import build_model, make_dataset
from emlens.interventions import RankOneAdapter, SteeringVector
from emlens.models import byte_tokenizer, load_model
from emlens.training import TrainConfig, train

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="qwen2.5-7b")
parser.add_argument("--ckpt", default="/tmp/emlens-multi-gpu-ckpt")
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--out", default="benchmarks/multi_gpu.json")
args = parser.parse_args()

n_gpus = torch.cuda.device_count()
if n_gpus < 2:
    raise SystemExit(f"needs at least 2 GPUs, found {n_gpus}")
hf = build_model(args.model, "cuda:0", torch.bfloat16)
hf.save_pretrained(args.ckpt)
byte_tokenizer().save_pretrained(args.ckpt)
size_gib = sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**30
del hf
torch.cuda.empty_cache()
cap = f"{size_gib / n_gpus * 1.15:.1f}GiB"  # forces the weights to span every GPU
model = load_model(args.ckpt, dtype=torch.bfloat16, device_map="auto", max_memory={i: cap for i in range(n_gpus)})
placement = {}
for name, dev in model.original_model.hf_device_map.items():
    placement.setdefault(str(dev), []).append(name)
print({dev: len(mods) for dev, mods in placement.items()}, flush=True)
data = make_dataset(model.cfg.d_vocab, 8 * args.steps, 256)
report = {"gpus": [torch.cuda.get_device_name(i) for i in range(n_gpus)], "weights_GiB": round(size_gib, 2),
          "modules_per_device": {d: len(m) for d, m in placement.items()}, "runs": []}
for kind in ("steering", "adapter"):
    for cached in (True, False):
        for i in range(n_gpus):
            torch.cuda.reset_peak_memory_stats(i)
        iv = SteeringVector.for_model(model) if kind == "steering" else RankOneAdapter.for_model(model)
        t0 = time.perf_counter()
        res = train(model, iv, data, TrainConfig(lr=1e-4, max_steps=args.steps, batch_size=8, grad_accum=1,
                                                  progress=False, cache_prefix=cached))
        torch.cuda.synchronize()
        run = {"kind": kind, "cache_prefix": cached, "seconds": round(time.perf_counter() - t0, 2),
               "sft_losses": [round(r["sft"], 5) for r in res.losses], "final_norm": round(iv.norm, 4),
               "peak_GiB_per_gpu": [round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(n_gpus)]}
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
with open(args.out, "w") as fh:
    json.dump(report, fh, indent=2)
