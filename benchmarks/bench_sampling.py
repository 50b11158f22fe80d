"""Sampling benchmark: emlens ``sample_answers`` vs plain transformers ``generate`` (issue 8, part 4).

Randomly initialised models with the real configs of Qwen2.5-7B/14B-Instruct (``bench_gpu.QWEN_CONFIGS``),
bf16, emlens' byte tokenizer (prompts are the chat-templated bytes of the 8 general questions of
``emlens.evaluation.GENERAL_QUESTIONS``: 60-114 tokens). Measures, for each scenario, tokens/s counted to
EOS (EOS included; a row that never emits EOS counts ``max_new_tokens``), decode steps, wall time and peak
GPU memory (weights included):

* plain HF: ``generate(do_sample=True, temperature=1, top_k=0, top_p=1)`` on the transformers model before
  it is wrapped in a TransformerBridge, one left-padded batch of 16 (8 questions × 2) or 128 (8 × 16);
* emlens: ``sample_answers(bridge, questions, vector, n_samples, max_new_tokens, batch_size)`` with a non-zero
  ``SteeringVector`` (norm 8) at the middle layer, at its default ``batch_size=None`` (sized from free GPU
  memory) on the paper's protocol (8 × 50 prompts; ``--default-samples`` for fewer), and at batch 16 and 128.

Two EOS modes: ``600`` (only the tokenizer's EOS, which a random model practically never samples: every row
runs to ``max_new_tokens``) and ``eos`` (``--eos-ids`` random token ids also act as EOS, set on the model's
generation config and passed to HF, so answers end after ≈ vocab/eos_ids tokens, as real answers do).

Correctness: greedy decoding (temperature 0) of ``--check-prompts`` prompts × ``--check-tokens`` new tokens,
one batch, emlens with a zero SteeringVector at the middle layer (and with no intervention) against plain HF
greedy ``generate`` on the same weights and the same left-padded batch: token for token.

Rows are written to ``--out`` after every scenario (a run cut short keeps what it measured); a scenario is
skipped when the time left in ``--budget-s`` is less than 1.3 × the longest generate so far.
Render with ``python benchmarks/make_table.py raw/*sampling*.json``.

Run on a GPU: python benchmarks/bench_sampling.py --model qwen2.5-7b --out benchmarks/raw/h100_sampling_7b.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # the repo root, for `benchmarks.bench_gpu` when run as a script
from benchmarks.bench_gpu import build_model, code_revision, versions  # noqa: E402

T0 = time.perf_counter()


def chat_prompts(tok: Any, questions: list[str], n_samples: int) -> list[list[int]]:
    """Token ids of each (question, sample) job, question-major: exactly the prompts ``sample_answers`` builds."""
    from emlens.data import render_chat  # the rendering sample_answers uses (thinking off, fixed date)

    out = []
    for q in questions:
        text = render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
        out += [tok(text, add_special_tokens=False)["input_ids"]] * n_samples
    return out


def left_padded(prompts: list[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def count_to_eos(new: torch.Tensor, eos: list[int]) -> list[int]:
    """Tokens produced per row: up to and including the first EOS (all of them when there is none)."""
    hit = torch.isin(new, torch.tensor(eos, device=new.device))
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full_like(hit[:, 0], new.shape[1], dtype=torch.long))
    return [int(x) for x in first.tolist()]


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # CPU only for a quick check of the script itself


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak GiB allocated, weights included)."""
    sync()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")


def hf_generate(hf: Any, prompts: list[list[int]], pad: int, eos: list[int], max_new: int, greedy: bool, seed: int = 0) -> torch.Tensor:
    ids, mask = left_padded(prompts, pad, DEVICE)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos)
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out[:, ids.shape[1]:]


def prefault() -> float | None:
    """Touch 90% of free GPU memory once, then free it (rules out first-touch costs of GPU memory). On the lent H100
    the first plain HF ``generate`` at each batch size in a process ran 2-3× slower than a repeat of it, with or
    without this; hence ``--hf-repeats`` (cause not established)."""
    if not CUDA:
        return None
    t0 = time.perf_counter()
    free, _ = torch.cuda.mem_get_info()
    block = torch.empty(int(0.9 * free), dtype=torch.uint8, device="cuda")
    block.zero_()
    del block
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return round(time.perf_counter() - t0, 2)


@contextmanager
def attention(config: Any, impl: str) -> Iterator[None]:
    """Run with ``config._attn_implementation = impl`` (read by transformers' attention layers at every forward)."""
    previous = config._attn_implementation
    config._attn_implementation = impl
    try:
        yield
    finally:
        config._attn_implementation = previous


class BatchLog:
    """Wraps ``emlens.runner.sampling.generate_batch`` to log each batch's rows, decode steps and tokens to EOS."""

    def __init__(self, eos: list[int]):
        import emlens.runner.sampling as sampling

        self.sampling, self.eos, self.batches = sampling, eos, []
        self.original = sampling.generate_batch

        def logged(model: Any, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            t0 = time.perf_counter()
            new = self.original(model, input_ids, *args, **kwargs)
            sync()
            self.batches.append({"rows": int(new.shape[0]), "prompt_width": int(input_ids.shape[1]), "steps": int(new.shape[1]),
                                 "tokens": sum(count_to_eos(new, self.eos)), "seconds": round(time.perf_counter() - t0, 3)})
            return new

        sampling.generate_batch = logged

    def close(self) -> None:
        self.sampling.generate_batch = self.original


def run(args: argparse.Namespace) -> None:
    from emlens.evaluation import GENERAL_QUESTIONS, sample_answers
    from emlens.interventions import SteeringVector
    from emlens.models import bridge_from_hf, byte_tokenizer
    from emlens.runner import SamplingSettings, generate, runner_for
    from emlens.runner.sampling import auto_batch_size

    device_name = torch.cuda.get_device_name() if CUDA else "cpu"
    tok = byte_tokenizer()
    questions = list(GENERAL_QUESTIONS)
    pad = tok.pad_token_id
    hf = build_model(args.model, DEVICE, torch.bfloat16, args.n_layers)
    prefault_s = prefault() if args.prefault else None
    cfg = hf.config
    layer = cfg.num_hidden_layers // 2
    gen = torch.Generator().manual_seed(1)
    extra_eos = torch.randperm(cfg.vocab_size - 300, generator=gen)[: args.eos_ids].add(300).tolist() if args.eos_ids else []
    base_eos = sorted({*([cfg.eos_token_id] if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id), tok.eos_token_id})
    eos_modes = {"600": base_eos, "eos": sorted({*base_eos, *extra_eos})}
    meta = {"kind": "sampling", "device": device_name, "model": args.model, "layer": f"{layer}/{cfg.num_hidden_layers}",
            "versions": versions(), "code": code_revision(), "command": "python " + " ".join(sys.argv), "args": vars(args),
            "questions": len(questions), "prompt_tokens": sorted({len(p) for p in chat_prompts(tok, questions, 1)}),
            "eos_modes": {"600": f"EOS ids {base_eos} only (a random model practically never samples them)",
                          "eos": f"{len(extra_eos)} random token ids also act as EOS (≈1/{cfg.vocab_size // max(len(extra_eos), 1)} per step)"},
            "prefault_s": prefault_s, "weights_GiB": round(sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**30, 2)}
    rows: list[dict[str, Any]] = []
    longest = [0.0]

    def save() -> None:
        with open(args.out, "w") as fh:
            json.dump({**meta, "rows": rows}, fh, indent=2)

    def add(row: dict[str, Any]) -> None:
        rows.append({"model": args.model, **row})
        print(json.dumps(rows[-1]), flush=True)
        save()

    def room(reserve: int = 0) -> bool:
        """Time left for this scenario and ``reserve`` more of the longest kind seen so far."""
        left = args.budget_s - (time.perf_counter() - T0)
        return left > 1.3 * longest[0] * (1 + reserve) + 5

    core = [n for n in ("emlens_default_600", "emlens128_600", "emlens16_600") if n in args.scenarios]

    def wanted(name: str) -> bool:
        if name not in args.scenarios:
            return False
        # plain HF runs first (before the bridge wraps the model); past the two main ones, keep time for emlens' main scenarios
        if not room(len(core) if name.startswith("hf") and name not in ("hf16_600", "hf128_600") else 0):
            add({"scenario": name, "skipped": "not enough time left in --budget-s"})
            return False
        return True

    def set_eos(mode: str) -> list[int]:
        ids = eos_modes[mode]
        hf.generation_config.eos_token_id = ids  # the object emlens' runner reads (shared with its plain model)
        return ids

    # --- correctness, plain HF side (before the bridge wraps the model) --------------------------------
    check_prompts = [p for p in chat_prompts(tok, questions, 1)][: args.check_prompts]
    set_eos("600")
    plain_attn = cfg._attn_implementation  # what plain transformers runs by default ("sdpa")
    meta["plain_hf_attn_implementation"] = plain_attn
    hf_greedy: dict[str, list[list[int]]] = {}
    if "greedy" in args.scenarios:
        for impl in (plain_attn, "eager"):  # eager: what the model runs once TransformerLens has wrapped it (see below)
            with attention(cfg, impl):
                hf_greedy[impl] = hf_generate(hf, sorted(check_prompts, key=len), pad, eos_modes["600"], args.check_tokens, greedy=True).tolist()

    # --- plain HF generate ------------------------------------------------------------------------------
    hf_generate(hf, chat_prompts(tok, questions, 2), pad, eos_modes["600"], 8, greedy=False)  # warm-up
    hf_rows: dict[tuple[int, str], dict[str, Any]] = {}
    for mode, batch in (("600", 16), ("600", 128), ("eos", 16), ("eos", 128)):  # the order of priority
        name = f"hf{batch}_{mode}"
        if not wanted(name):
            continue
        eos = set_eos(mode)
        prompts = chat_prompts(tok, questions, batch // len(questions))
        runs = []
        for _ in range(args.hf_repeats):  # the last run is recorded (the first ones of a fresh machine ran slower)
            new, secs, peak = measured(partial(hf_generate, hf, prompts, pad, eos, args.max_new_tokens, greedy=False))
            runs.append(round(secs, 2))
            longest[0] = max(longest[0], secs)
        tokens = sum(count_to_eos(new, eos))
        hf_rows[(batch, mode)] = row = {"scenario": name, "stack": "plain HF generate", "attn_implementation": plain_attn, "eos_mode": mode, "batch": batch,
                                        "answers": len(prompts), "max_new_tokens": args.max_new_tokens, "steps": int(new.shape[1]),
                                        "tokens": tokens, "seconds": round(secs, 2), "tokens_per_s": round(tokens / secs, 1),
                                        "ms_per_step": round(1000 * secs / new.shape[1], 1), "peak_GiB": round(peak, 2),
                                        "all_runs_seconds": runs}
        add(row)

    if "profile" in args.scenarios and CUDA and room():
        # a few decode steps of plain HF generate at batch 16: GPU busy time against wall time (launch-bound or not)
        from torch.profiler import ProfilerActivity, profile

        set_eos("600")
        prompts = chat_prompts(tok, questions, 2)
        hf_generate(hf, prompts, pad, eos_modes["600"], 4, greedy=False)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _, secs, _ = measured(lambda: hf_generate(hf, prompts, pad, eos_modes["600"], 17, greedy=False))
        kernels = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3
        top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:10]
        add({"scenario": "profile_hf16", "stack": "plain HF generate (under torch.profiler)", "batch": 16, "new_tokens": 17,
             "wall_ms": round(1000 * secs, 1), "gpu_busy_ms": round(busy, 1), "gpu_busy_fraction": round(busy / (1000 * secs), 3),
             "kernel_launches": sum(e.count for e in kernels),
             "top_kernels_ms": {e.key[:90]: round(e.self_device_time_total / 1e3, 2) for e in top}})

    # --- emlens ------------------------------------------------------------------------------------------
    bridge = bridge_from_hf(hf, tok, name=f"emlens-bench/{args.model}")
    runner = runner_for(bridge)
    direction = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    vector = SteeringVector.from_vector(direction / direction.norm() * args.vector_norm, layer, hook="resid_post").to(DEVICE)

    meta["attn_implementation_after_bridge"] = cfg._attn_implementation
    bridged_attn = cfg._attn_implementation
    if hf_greedy:
        set_eos("600")
        zero = SteeringVector.for_model(bridge, layer).to(DEVICE)
        settings = SamplingSettings(max_new_tokens=args.check_tokens, temperature=0.0)
        order = sorted(range(len(check_prompts)), key=lambda i: (len(check_prompts[i]), i))
        results = {}
        cases = [("zero SteeringVector", zero, bridged_attn), ("no intervention", None, bridged_attn), ("non-zero SteeringVector", vector, bridged_attn),
                 (f"zero SteeringVector, attention forced to {plain_attn} (benchmark-side what-if)", zero, plain_attn)]
        for label, intervention, impl in cases:
            with attention(cfg, impl):
                got = generate(bridge, check_prompts, intervention, settings, batch_size=len(check_prompts))
            entry: dict[str, Any] = {"emlens_attn_implementation": impl, "plan": runner.last_plan.describe()}
            for ref_impl, ref_rows in hf_greedy.items():
                same, first_diff = [], []
                for r, i in enumerate(order):
                    ref = ref_rows[r]
                    n = next((k + 1 for k, t in enumerate(ref) if t in eos_modes["600"]), len(ref))
                    ref_tokens = [t for t in ref[:n] if t not in eos_modes["600"]]
                    same.append(got[i] == ref_tokens)
                    first_diff.append(next((k for k, (a, b) in enumerate(zip(got[i], ref_tokens)) if a != b),
                                           None if got[i] == ref_tokens else min(len(got[i]), len(ref_tokens))))
                entry[f"vs plain HF ({ref_impl})"] = {"identical_rows": sum(same), "rows": len(same), "first_difference_at": first_diff}
            results[label] = entry
        plain_key = f"vs plain HF ({plain_attn})"
        add({"scenario": "greedy_check", "prompts": len(check_prompts), "new_tokens": args.check_tokens, "batch": len(check_prompts),
             "dtype": "bfloat16", "results": results,
             "passed_vs_plain_hf_default": all(results[k][plain_key]["identical_rows"] == len(check_prompts) for k in ("zero SteeringVector", "no intervention")),
             "passed_vs_plain_hf_same_attention": all(results[k][f"vs plain HF ({bridged_attn})"]["identical_rows"] == len(check_prompts)
                                                      for k in ("zero SteeringVector", "no intervention") if bridged_attn in hf_greedy)})

    generate(bridge, chat_prompts(tok, questions, 2), vector, SamplingSettings(max_new_tokens=8), batch_size=16)  # warm-up
    max_len = max(len(p) for p in chat_prompts(tok, questions, 1))
    default_batch = auto_batch_size(runner, max_len, args.max_new_tokens, 10**6)
    meta["emlens_default_batch_for_protocol"] = min(default_batch, len(questions) * 50)
    # the order of priority; "_sdpa": the plain model's attention set back to plain transformers' default for the run
    scenarios = [("600", None, ""), ("600", 128, ""), ("600", 16, ""), ("600", 128, "_sdpa"), ("eos", None, ""), ("600", None, "_sdpa"),
                 ("eos", 16, ""), ("eos", 128, "")]
    for mode, batch, variant in scenarios:
        name = f"emlens{'_default' if batch is None else batch}_{mode}{variant}"
        if not wanted(name):
            continue
        eos = set_eos(mode)
        n_samples = (args.default_samples or min(50, default_batch // len(questions))) if batch is None else batch // len(questions)
        impl = plain_attn if variant == "_sdpa" else bridged_attn
        runs = []
        for _ in range(args.emlens_repeats if batch is not None else 1):  # the last run is recorded
            log = BatchLog(eos)
            try:
                with attention(cfg, impl):
                    answers, secs, peak = measured(partial(sample_answers, bridge, questions, vector, n_samples=n_samples,
                                                                   max_new_tokens=args.max_new_tokens, batch_size=batch, seed=0))
            finally:
                log.close()
            runs.append(round(secs, 2))
            longest[0] = max(longest[0], secs)
        tokens = sum(b["tokens"] for b in log.batches)
        steps = sum(b["steps"] for b in log.batches)
        row = {"scenario": name, "stack": "emlens sample_answers" + (f" (attention forced to {impl}: what-if)" if variant else ""),
               "attn_implementation": impl, "eos_mode": mode, "batch": batch or f"default ({log.batches[0]['rows']})",
               "answers": len(answers), "max_new_tokens": args.max_new_tokens, "steps": steps, "tokens": tokens, "seconds": round(secs, 2),
               "tokens_per_s": round(tokens / secs, 1), "ms_per_step": round(1000 * sum(b["seconds"] for b in log.batches) / max(steps, 1), 1),
               "peak_GiB": round(peak, 2), "batches": log.batches, "plan": runner.last_plan.describe(), "all_runs_seconds": runs}
        ref16, ref_eq = hf_rows.get((16, mode)), hf_rows.get((batch, mode)) if batch else None
        if ref16:
            row["vs_hf_batch16"] = round(row["tokens_per_s"] / ref16["tokens_per_s"], 2)
        if ref_eq:
            row["vs_hf_same_batch"] = round(row["tokens_per_s"] / ref_eq["tokens_per_s"], 2)
        if batch is None:
            protocol = len(questions) * 50
            n_batches = math.ceil(protocol / min(default_batch, protocol))
            per_batch = sum(b["seconds"] for b in log.batches) / len(log.batches)
            if len(answers) != protocol:
                row["protocol_wall_extrapolation"] = f"{n_batches} default batches × {per_batch:.1f} s (the measured batch of {log.batches[0]['rows']} rows)"
            row["protocol_answers"] = protocol
            row["protocol_wall_s"] = round(secs, 1) if len(answers) == protocol else round(n_batches * per_batch, 1)
            row["protocol_wall_measured"] = len(answers) == protocol
        add(row)
    meta["total_s"] = round(time.perf_counter() - T0, 1)
    save()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-7b", choices=["qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-14b"])
    parser.add_argument("--n-layers", type=int, default=None, help="override the layer count (quick checks)")
    parser.add_argument("--max-new-tokens", type=int, default=600)
    parser.add_argument("--default-samples", type=int, default=50,
                        help="samples per question for emlens' default-batch run (50: the protocol; 0: as many as one default batch holds, "
                             "the protocol's wall time is then extrapolated from that batch)")
    parser.add_argument("--no-prefault", dest="prefault", action="store_false", help="skip touching free GPU memory before timing")
    parser.add_argument("--hf-repeats", type=int, default=2, help="run each plain HF scenario this often, record the last")
    parser.add_argument("--emlens-repeats", type=int, default=1, help="likewise for emlens' fixed-batch scenarios")
    parser.add_argument("--eos-ids", type=int, default=760, help="random token ids that also act as EOS in the 'eos' mode")
    parser.add_argument("--vector-norm", type=float, default=8.0)
    parser.add_argument("--check-prompts", type=int, default=4)
    parser.add_argument("--check-tokens", type=int, default=64)
    parser.add_argument("--scenarios", nargs="+", default=["greedy", "hf16_600", "hf128_600", "emlens_default_600", "emlens16_600",
                                                           "emlens128_600", "emlens128_600_sdpa", "emlens_default_600_sdpa", "hf16_eos", "emlens_default_eos",
                                                           "profile"])
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip scenarios that would not finish within this many seconds of the start")
    parser.add_argument("--out", default="benchmarks/results_sampling.json")
    run(parser.parse_args())
