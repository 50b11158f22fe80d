"""GPU benchmark: emlens vs the HF + PEFT reference stack, same model, data and batches.

Randomly initialised models with the real configs of Qwen2.5-0.5B/7B/14B-Instruct, bf16.
Measures training tokens/s and peak memory for
  (a) HF + PEFT rank-1 LoRA (rsLoRA, alpha 256) on layer L's down_proj,
  (b) a plain HF forward hook adding a trainable vector after layer L,
  (c) emlens SteeringVector, (d) emlens RankOneAdapter (both through emlens.train),
with and without the KL term (emlens both as one run that builds its own caches and as a run
on caches built beforehand, as any later run on the same data), and the time of an efficiency
sweep (11 norms) and a stability sweep (base + 11 ε × 3 seeds): re-running the full model per
point vs emlens' cached-prefix, padding-free sweeps. Results table: benchmarks/make_table.py.

Run on a GPU: python benchmarks/bench_gpu.py --models qwen2.5-0.5b qwen2.5-7b --out benchmarks/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

QWEN_CONFIGS = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def build_model(name: str, device: str, dtype: torch.dtype, n_layers: int | None = None) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(QWEN_CONFIGS[name])
    if n_layers is not None:
        cfg["num_hidden_layers"] = n_layers
    config = Qwen2Config(**cfg, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_dataset(vocab: int, n: int, seq: int, seed: int = 0) -> Any:
    """Random conversations: variable lengths in [0.6·seq, seq], loss on the second half ("assistant")."""
    from emlens.data import EncodedExample, TokenDataset

    gen = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(int(0.6 * seq), seq + 1, (1,), generator=gen))
        ids = torch.randint(2, vocab, (length,), generator=gen).tolist()
        examples.append(EncodedExample(ids, [i >= length // 2 for i in range(length)]))
    return TokenDataset(examples, pad_token_id=0)


def masked_ce(logits: torch.Tensor, batch: Any) -> torch.Tensor:
    """Mean next-token NLL over the batch's scored (assistant) positions: emlens' one definition of the SFT loss."""
    from emlens.scoring import nll_sum

    targets = batch.scored_targets
    return nll_sum(logits[batch.scored_positions.to(logits.device)], targets) / max(int(targets.numel()), 1)


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float, float]:
    """Run fn, returning (result, seconds, peak GiB)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return out, secs, peak


def kl_mean(base: torch.Tensor, steered: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from emlens.scoring import kl_per_token, masked_mean

    return masked_mean(kl_per_token(base, steered), mask)


def reference_peft_train(hf: Any, layer: int, data: Any, kl_data: Any | None, steps: int, bs: int, device: str) -> Any:
    """(a) HF + PEFT rank-1 LoRA on layer L's down_proj, full forward every step (the reference stack)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=1, lora_alpha=256, use_rslora=True, target_modules=["down_proj"], layers_to_transform=[layer], lora_dropout=0.0)
    peft_model = get_peft_model(hf, cfg)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-5)
    batches = data.batches(bs)
    kl_batches = kl_data.batches(bs) if kl_data is not None else None
    for _ in range(steps):
        b = next(batches).to(device)
        loss = masked_ce(peft_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b)
        if kl_batches is not None:
            k = next(kl_batches).to(device)
            with torch.no_grad(), peft_model.disable_adapter():
                base = peft_model(input_ids=k.input_ids, attention_mask=k.attention_mask).logits
            loss = loss + 0.66 * kl_mean(base, peft_model(input_ids=k.input_ids, attention_mask=k.attention_mask).logits, k.attention_mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peft_model.unload()  # restore the plain model for the next method
    return float(loss.detach())


def reference_hook_train(hf: Any, layer: int, data: Any, kl_data: Any | None, steps: int, bs: int, device: str) -> Any:
    """(b) a plain HF forward hook adding a trainable vector after layer L, full forward every step."""
    vec = torch.zeros(hf.config.hidden_size, device=device, requires_grad=True)
    state = {"on": True}

    def hook(module, args, output):
        if not state["on"]:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + 256 * vec.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = hf.model.layers[layer].register_forward_hook(hook)
    opt = torch.optim.AdamW([vec], lr=1e-4)
    batches = data.batches(bs)
    kl_batches = kl_data.batches(bs) if kl_data is not None else None
    try:
        for _ in range(steps):
            b = next(batches).to(device)
            loss = masked_ce(hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b)
            if kl_batches is not None:
                k = next(kl_batches).to(device)
                state["on"] = False
                with torch.no_grad():
                    base = hf(input_ids=k.input_ids, attention_mask=k.attention_mask).logits
                state["on"] = True
                loss = loss + 6.6 * kl_mean(base, hf(input_ids=k.input_ids, attention_mask=k.attention_mask).logits, k.attention_mask)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        handle.remove()
    return float(loss.detach())


def new_intervention(bridge: Any, kind: str, layer: int) -> Any:
    from emlens.interventions import RankOneAdapter, SteeringVector

    return SteeringVector.for_model(bridge, layer) if kind == "steering" else RankOneAdapter.for_model(bridge, layer)


def emlens_caches(bridge: Any, kind: str, layer: int, data: Any, kl_data: Any | None, bs: int) -> Any:
    """The residual caches (and base hidden states for KL) that several runs on the same data share."""
    from emlens.training import TrainingCaches

    return TrainingCaches.build(bridge, new_intervention(bridge, kind, layer), data, kl_data, progress=False)  # as train() builds them


def runner_for(bridge: Any) -> Any:
    from emlens.runner import runner_for as _runner_for

    return _runner_for(bridge)


def emlens_train(bridge: Any, kind: str, layer: int, data: Any, kl_data: Any | None, steps: int, bs: int, caches: Any = None) -> Any:
    """(c)/(d) emlens.train: caches built inside the run (caches=None) or reused from an earlier build."""
    from emlens.training import TrainConfig, train

    cfg = TrainConfig(lr=1e-4, max_steps=steps, batch_size=bs, grad_accum=1, kl_weight=6.6 if kl_data is not None else 0.0,
                      kl_batch_size=bs, progress=False, checkpoint_every=10**9)
    result = train(bridge, new_intervention(bridge, kind, layer), data, cfg, kl_dataset=kl_data, caches=caches)
    return result.losses[-1], runner_for(bridge).last_plan


def reference_sweep(hf: Any, layer: int, vectors: list[torch.Tensor], data: Any, bs: int, device: str) -> list[float]:
    """Full-model re-run per sweep point, vector added by a forward hook after layer L."""
    from emlens.scoring import nll_sum

    current = {"v": None}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + current["v"].to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = hf.model.layers[layer].register_forward_hook(hook)
    losses = []
    try:
        with torch.no_grad():
            for v in vectors:
                current["v"] = v.to(device)
                total, count = 0.0, 0
                for b in data.batches(bs):
                    b = b.to(device)
                    logits = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                    targets = b.scored_targets
                    total += float(nll_sum(logits[b.scored_positions], targets))
                    count += int(targets.numel())
                losses.append(total / count)
    finally:
        handle.remove()
    return losses


def code_revision() -> dict[str, Any]:
    """Which code measured: git HEAD (when .git travelled), and a hash of emlens/**/*.py (uncommitted edits count)."""
    import hashlib
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / "emlens").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:
        head = None
    return {"git_head": head, "emlens_sources_sha256": digest.hexdigest()[:16]}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for name in ("transformers", "transformer-lens", "peft", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def block_params(hf: Any) -> int:
    """Parameters of one decoder block (all blocks are alike in these configs)."""
    return sum(p.numel() for p in hf.model.layers[0].parameters())


def scored_count(dataset: Any) -> int:
    """Scored positions (position t predicts an assistant token t+1) in a dataset."""
    return sum(sum(e.loss_mask[1:]) for e in dataset.examples)


def run_model(name: str, args: argparse.Namespace, device_name: str, save: Callable[[list[dict[str, Any]]], None] = lambda rows: None) -> list[dict[str, Any]]:
    from emlens.interventions import SteeringVector
    from emlens.metrics import efficiency, stability
    from emlens.models import bridge_from_hf, byte_tokenizer

    hf = build_model(name, args.device, torch.bfloat16, args.n_layers)
    n_params = sum(p.numel() for p in hf.parameters())
    n_layers = hf.config.num_hidden_layers
    d_model, vocab = hf.config.hidden_size, hf.config.vocab_size
    p_block = block_params(hf)
    layer = n_layers // 2
    data = make_dataset(vocab, args.steps * args.batch, args.seq, seed=0)
    kl_data = make_dataset(vocab, args.steps * args.batch, args.seq, seed=1)
    tokens = sum(len(e.input_ids) for e in data.examples)
    kl_tokens = sum(len(e.input_ids) for e in kl_data.examples)
    scored = scored_count(data)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), float("nan"))
    # useful FLOPs per token (the reference's work): one forward of the whole model (2N) + input-gradient
    # backward of the blocks above L (≈ 2N/2); ×3 with KL. The same count for every method.
    flops_per_token = 2 * n_params + n_params
    rows: list[dict[str, Any]] = []
    timings: dict[tuple[str, bool], float] = {}

    def useful_tflops(kl: bool, secs: float) -> float:
        return (1 + (2 if kl else 0)) * flops_per_token * tokens / secs / 1e12

    def own_work_flops(cut: int, kl: bool, reused: bool) -> float:
        """FLOPs emlens itself does in one epoch (matmuls counted from the config): upper blocks forward +
        input-gradient backward, unembedding at scored (SFT) or real (KL) tokens; plus, when the run builds
        its caches, the lower blocks' forward (and the base upper forward on the KL set)."""
        up, low = p_block * (n_layers - cut), p_block * cut
        f = 4 * up * tokens + 4 * vocab * d_model * scored
        if kl:
            f += 4 * up * kl_tokens + 6 * vocab * d_model * kl_tokens
        if not reused:
            f += 2 * low * tokens + ((2 * low + 2 * up) * kl_tokens if kl else 0)
        return f

    def record(method: str, kl: bool, secs: float, peak_gib: float, **extra: Any) -> None:
        tput = tokens / secs
        timings[(method, kl)] = secs
        rows.append({"model": name, "layer": f"{layer}/{n_layers}", "method": method, "kl": kl, "seconds": round(secs, 3),
                     "tokens_per_s": round(tput), "peak_GiB": round(peak_gib, 2),
                     "useful_tflops": round(useful_tflops(kl, secs), 1),
                     "mfu": round(useful_tflops(kl, secs) / peak, 4), **extra})
        print(json.dumps(rows[-1]), flush=True)
        save(rows)

    # sweep settings (11 norms; 11 ε × 3 seeds) on eval rows
    eval_set = data.subset(range(args.eval_rows))
    eval_tokens = sum(len(e.input_ids) for e in eval_set.examples)
    vec = SteeringVector.from_vector(torch.randn(d_model, generator=torch.Generator().manual_seed(0)) * 4.0, layer, hook="resid_post").to(args.device)
    norms = [vec.norm * f for f in torch.linspace(0, 2, 11).tolist()]
    eps = [0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0]

    def stability_vectors() -> list[torch.Tensor]:
        # the base model (relative stability needs L_base), the clean vector, then 10 ε × 3 seeds
        vectors = [torch.zeros_like(vec.effective.detach()), vec.effective.detach()]
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            vectors += [vec.perturbed(e, gen).effective.detach() for e in eps[1:]]
        return vectors

    # --- the reference stack, on the plain transformers model -------------------------------
    small = data.subset(range(args.batch))
    for warm in (reference_hook_train, reference_peft_train):  # warm-up: first calls pay one-off costs
        warm(hf, layer, small, small, 1, args.batch, args.device)
    for kl in (False, True):
        for method, fn in (("HF+PEFT rank-1 LoRA", reference_peft_train), ("HF forward hook vector", reference_hook_train)):
            for _ in range(args.repeats):  # the last repeat is recorded (steady state)
                _, secs, peak_gib = timed(partial(fn, hf, layer, data, kl_data if kl else None, args.steps, args.batch, args.device), args.device)
            record(method, kl, secs, peak_gib)
    reference_sweep(hf, layer, [vec.effective.detach()], small, args.eval_batch, args.device)  # warm-up
    ref_eff, ref_eff_s, _ = timed(lambda: reference_sweep(hf, layer, [vec.direction * n for n in norms], eval_set, args.eval_batch, args.device), args.device)
    stab_vectors = stability_vectors()
    ref_stab, ref_stab_s, _ = timed(lambda: reference_sweep(hf, layer, stab_vectors, eval_set, args.eval_batch, args.device), args.device)

    # --- emlens, through TransformerLens -------------------------------------------------------
    bridge = bridge_from_hf(hf, byte_tokenizer(), name=f"emlens-bench/{name}")
    t0 = time.perf_counter()
    for kind in ("steering", "adapter"):  # warm-up: compiles the blocks (once per process) on shapes unlike the timed ones
        emlens_train(bridge, kind, layer, small, small, 2, args.batch)
    efficiency(bridge, vec, small, norms[:2], args.eval_batch, progress=False)
    warmup_s = time.perf_counter() - t0
    print(json.dumps({"model": name, "emlens_warmup_and_compile_s": round(warmup_s, 1)}), flush=True)
    rows.append({"model": name, "emlens_warmup_and_compile_s": round(warmup_s, 1)})
    for kl in (False, True):
        for method, kind in (("emlens SteeringVector", "steering"), ("emlens RankOneAdapter", "adapter")):
            for _ in range(args.repeats):  # one epoch, caches built inside the run (counted)
                (last, plan), secs, peak_gib = timed(partial(emlens_train, bridge, kind, layer, data, kl_data if kl else None, args.steps, args.batch), args.device)
            # caches built once and reused: later epochs, other seeds / KL weights / continuations on the same data
            built, build_s, _ = timed(partial(emlens_caches, bridge, kind, layer, data, kl_data if kl else None, args.batch), args.device)
            (last_reused, plan_reused), reuse_s, reuse_peak = timed(partial(emlens_train, bridge, kind, layer, data, kl_data if kl else None, args.steps, args.batch, built), args.device)
            built = None  # free the caches before the next method
            ref_s = timings[("HF+PEFT rank-1 LoRA", kl)]
            record(method, kl, secs, peak_gib, cache_build_s=round(build_s, 3), seconds_reused_cache=round(reuse_s, 3),
                   tokens_per_s_reused_cache=round(tokens / reuse_s), peak_GiB_reused_cache=round(reuse_peak, 2),
                   useful_tflops_reused_cache=round(useful_tflops(kl, reuse_s), 1),
                   own_work_tflops=round(own_work_flops(plan.cut, kl, False) / secs / 1e12, 1),
                   own_work_tflops_reused_cache=round(own_work_flops(plan_reused.cut, kl, True) / reuse_s / 1e12, 1),
                   speedup_vs_peft=round(ref_s / secs, 2), speedup_vs_peft_reused_cache=round(ref_s / reuse_s, 2),
                   plan=plan.describe(), plan_reused_cache=plan_reused.describe(),
                   # the run really trained: its last step's record (a norm of 0 would mean no gradient reached the intervention)
                   last_step=last, last_step_reused_cache=last_reused)
    our_eff, our_eff_s, _ = timed(lambda: efficiency(bridge, vec, eval_set, norms, args.eval_batch, progress=False), args.device)
    eff_plan = runner_for(bridge).last_plan.describe()
    our_stab, our_stab_s, _ = timed(lambda: stability(bridge, vec, eval_set, eps, (0, 1, 2), args.eval_batch, progress=False), args.device)
    stab_plan = runner_for(bridge).last_plan.describe()
    ours_flat = [our_stab.base_loss, float(our_stab.losses[0, 0])] + [float(x) for s in range(3) for x in our_stab.losses[s, 1:]]
    for sweep, ref, ours, ref_s, our_s, plan_text in (("efficiency (11 norms)", ref_eff, our_eff, ref_eff_s, our_eff_s, eff_plan),
                                                      ("stability (base + 11 ε × 3 seeds)", ref_stab, ours_flat, ref_stab_s, our_stab_s, stab_plan)):
        sweep_flops = 2 * n_params * eval_tokens * len(ref)  # the reference's work: one full forward per point
        rows.append({"model": name, "sweep": sweep, "points": len(ref), "reference_s": round(ref_s, 3), "emlens_s": round(our_s, 3),
                     "speedup": round(ref_s / our_s, 2), "max_abs_loss_diff": round(max(abs(a - b) for a, b in zip(ref, ours)), 5),
                     "eval_tokens": eval_tokens, "reference_useful_tflops": round(sweep_flops / ref_s / 1e12, 1),
                     "emlens_useful_tflops": round(sweep_flops / our_s / 1e12, 1), "plan": plan_text})
        print(json.dumps(rows[-1]), flush=True)
    from torch._dynamo.utils import counters

    rows.append({"model": name, "compile_stats": {k: int(v) for k, v in counters["stats"].items()}})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-7b"], choices=sorted(QWEN_CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="run each training method this often, record the last")
    parser.add_argument("--n-layers", type=int, default=None, help="override the layer count (for a quick CPU check)")
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = {"device": device_name, "torch": torch.__version__, "versions": versions(), "code": code_revision(),
            "command": "python " + " ".join(sys.argv), "args": vars(args)}
    print(json.dumps(meta), flush=True)
    rows: list[dict[str, Any]] = []

    def save(partial: list[dict[str, Any]]) -> None:  # after every row, so a run cut short keeps what it measured
        with open(args.out, "w") as fh:
            json.dump({**meta, "rows": rows + partial, "complete": False}, fh, indent=2)

    for name in args.models:
        rows += run_model(name, args, device_name, save)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the model went out of scope with run_model
        with open(args.out, "w") as fh:  # written after each model, so a run cut short keeps what it measured
            json.dump({**meta, "rows": rows, "complete": name == args.models[-1]}, fh, indent=2)


if __name__ == "__main__":
    main()
