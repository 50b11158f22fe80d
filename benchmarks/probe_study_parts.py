"""Where the 14B study's time goes, part by part (issue 18): fused training steps and the sampler's decode step.

Random-init Qwen2.5-14B config (bf16) wrapped with ``bridge_from_hf`` and SmolLM2's tokenizer, as in ``study_gpu.py``.

* ``train``: the real ``emlens.train`` on the built-in medical rows (cycled), micro-batch 2 × grad-accum 8 as the
  paper trains, ``--train-steps`` steps, for the steering vector without and with the KL term (KL batch 8); caches
  built before timing, one warm-up step (compilation) not timed. Reports seconds per step and tokens per second.
* ``decode``: ``emlens.runner.sampling.generate_batch`` (emlens' slot-cache decoder, transformers' ``generate`` before
  commit 9ca6619) at batch
  ``--rows`` on the 8 general questions' chat prompts (left padded, as the study samples), ``--new`` tokens against
  2 tokens: milliseconds per decode step; then the same with every row the same prompt (no padding: no mask); then
  a torch.profiler table of a few decode steps.
* ``decode_paths``: decode steps alone (a profile of 5 steps after the prefill and 4 steps), and transformers'
  ``generate`` with a static KV cache, eager and auto-compiled (CUDA graphs), in ms per step.

    python benchmarks/probe_study_parts.py --tokenizer .tok_smollm2 --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_gpu import build_model, code_revision, versions  # noqa: E402
from benchmarks.bench_sampling import chat_prompts, left_padded  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def timed(fn: Any) -> tuple[Any, float]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def probe_train(bridge: Any, tok: Any, steps: int, record: dict[str, Any], save: Any) -> None:
    from emlens import SteeringVector, TokenDataset, TrainConfig, train
    from emlens.data import read_conversations
    from emlens.data.studies import kl_conversations
    from emlens.training import TrainingCaches

    rows = read_conversations("medical_harmful", split="train")
    rows = [rows[i % len(rows)] for i in range(16 * (steps + 1))]
    data = TokenDataset.from_conversations(tok, rows, 256)
    kl = TokenDataset.from_conversations(tok, kl_conversations("medical", 8 * (steps + 1), 0), 256)
    layer = bridge.cfg.n_layers // 2
    for kl_weight in (0.0, 6.6):
        vec = SteeringVector.for_model(bridge, layer, alpha=256.0)
        caches, build_s = timed(lambda: TrainingCaches.build(bridge, vec, data, kl if kl_weight else None, progress=False))
        cfg = dict(lr=1e-4, batch_size=2, grad_accum=8, warmup_steps=5, kl_weight=kl_weight, kl_batch_size=8, progress=False)
        timed(lambda: train(bridge, SteeringVector.for_model(bridge, layer, alpha=256.0), data, TrainConfig(max_steps=1, **cfg),
                            kl_dataset=kl, caches=caches))
        result, secs = timed(lambda: train(bridge, vec, data, TrainConfig(max_steps=steps + 1, **cfg), kl_dataset=kl, caches=caches))
        tokens = sum(len(e.input_ids) for e in data.examples[: 16 * steps])
        record["train"].append({
            "kl_weight": kl_weight, "steps": steps + 1, "seconds": round(secs, 2), "s_per_step": round(secs / (steps + 1), 4),
            "sft_tokens_per_s": round(tokens / secs * (steps + 1) / steps, 1), "cache_build_s": round(build_s, 2),
            "plan": result.plan, "last": result.losses[-1], "peak_GiB": peak_gib(),
        })
        print(json.dumps(record["train"][-1]), flush=True)
        save()


def probe_decode(bridge: Any, tok: Any, rows: int, new: int, record: dict[str, Any], save: Any) -> None:
    from emlens.evaluation import GENERAL_QUESTIONS
    from emlens.runner.sampling import SamplingSettings, generate_batch

    per_q = max(1, rows // len(GENERAL_QUESTIONS))
    prompts = chat_prompts(tok, list(GENERAL_QUESTIONS), per_q)
    pad = bridge.tokenizer.pad_token_id
    cases = {"mixed lengths (left padded)": prompts, "one prompt (no padding)": [prompts[0]] * len(prompts)}
    for label, ps in cases.items():
        ids, mask = left_padded(ps, pad, str(bridge.cfg.device))
        out = {}
        for n in (2, new):
            settings = SamplingSettings(max_new_tokens=n, temperature=1.0)
            _, out[n] = timed(lambda: generate_batch(bridge, ids, mask, None, settings, seed=0))
        record["decode"].append({
            "case": label, "rows": len(ps), "prompt_width": ids.shape[1], "new": new, "s_2": round(out[2], 3), f"s_{new}": round(out[new], 3),
            "ms_per_step": round(1000 * (out[new] - out[2]) / (new - 2), 2), "peak_GiB": peak_gib(),
        })
        print(json.dumps(record["decode"][-1]), flush=True)
        save()
    ids, mask = left_padded(prompts, pad, str(bridge.cfg.device))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate_batch(bridge, ids, mask, None, SamplingSettings(max_new_tokens=6, temperature=1.0), seed=0)
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    record["decode_profile"] = table
    print(table, flush=True)
    save()


def probe_decode_paths(bridge: Any, tok: Any, rows: int, new: int, record: dict[str, Any], save: Any) -> None:
    """Decode steps alone: a profile of 5 steps of transformers' dynamic-cache ``generate`` (after the prefill and
    4 steps), then ``generate`` with a static cache, eager and auto-compiled (CUDA graphs), in ms per step."""
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import LogitsProcessor, LogitsProcessorList, StaticCache

    from emlens.evaluation import GENERAL_QUESTIONS
    from emlens.runner import runner_for
    from emlens.runner.sampling import plain_attention

    plain = runner_for(bridge).plain
    prompts = chat_prompts(tok, list(GENERAL_QUESTIONS), max(1, rows // len(GENERAL_QUESTIONS)))
    ids, mask = left_padded(prompts, tok.pad_token_id, str(bridge.cfg.device))
    kwargs: dict[str, Any] = dict(attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id)

    class StepProfiler(LogitsProcessor):
        def __init__(self, prof: Any) -> None:
            self.prof = prof

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.prof.step()
            return scores

    record.setdefault("decode_paths", [])
    with plain_attention(plain), torch.no_grad():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=schedule(wait=3, warmup=2, active=5)) as prof:
            plain.generate(ids, max_new_tokens=12, logits_processor=LogitsProcessorList([StepProfiler(prof)]), **kwargs)
            sync()
        record["decode_steps_profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        print(record["decode_steps_profile"], flush=True)
        save()
        length = ids.shape[1] + new
        for compiled in (False, True):
            def gen(n: int) -> Any:
                cache = StaticCache(config=plain.config, max_cache_len=length)
                return plain.generate(ids, max_new_tokens=n, cache=cache, disable_compile=not compiled, **kwargs)

            _, first = timed(lambda: gen(2))
            _, s2 = timed(lambda: gen(2))
            _, sn = timed(lambda: gen(new))
            record["decode_paths"].append({
                "cache": "static", "compiled": compiled, "rows": ids.shape[0], "prompt_width": ids.shape[1], "new": new,
                "first_call_s": round(first, 2), "s_2": round(s2, 3), f"s_{new}": round(sn, 3),
                "ms_per_step": round(1000 * (sn - s2) / (new - 2), 2), "peak_GiB": peak_gib(),
            })
            print(json.dumps(record["decode_paths"][-1]), flush=True)
            save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--model", default="qwen2.5-14b")
    p.add_argument("--parts", nargs="+", default=["decode", "train"])
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--new", type=int, default=150)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--n-layers", type=int, default=None, help="fewer layers (a CPU smoke test of the script)")
    p.add_argument("--sdpa-backends", choices=("emlens", "all"), default="emlens",
                   help="decode: emlens' SDPA kernels (all but cuDNN's) or every kernel, cuDNN's first, as PyTorch prefers")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from emlens.models import bridge_from_hf

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.sdpa_backends == "all":
        import emlens.runner.decoding as decoding
        from torch.nn.attention import SDPBackend

        decoding.DECODE_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    record: dict[str, Any] = {"command": " ".join(sys.argv), "versions": versions(), "code": code_revision(),
                              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "train": [], "decode": []}

    def save() -> None:
        Path(args.out).write_text(json.dumps(record, indent=1))

    hf, record["build_s"] = timed(lambda: build_model(args.model, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32, args.n_layers))
    bridge = bridge_from_hf(hf, tok, name=f"probe/{args.model}")
    for part in args.parts:
        if part == "decode":
            probe_decode(bridge, tok, args.rows, args.new, record, save)
        elif part == "decode_paths":
            probe_decode_paths(bridge, tok, args.rows, args.new, record, save)
        else:
            probe_train(bridge, tok, args.train_steps, record, save)
    save()


if __name__ == "__main__":
    main()
