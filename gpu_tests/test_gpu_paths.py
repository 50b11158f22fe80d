"""The CUDA fast path equals plain transformers: flash attention over packed sequences, compiled blocks, sync-free steps.

CI has no GPU, so these run on a GPU machine: ``python -m pytest -q gpu_tests`` (they fail,
rather than skip, without CUDA). Tiny random models of every proved architecture, on CUDA in
float32 (tight tolerances: the per-sequence attention path) and bfloat16 (flash attention and
compiled blocks, the path large models take); the reference is plain transformers on the same
device and dtype with the edit made by a forward hook or weight surgery (tests/test_parity.py).
"""

from __future__ import annotations

import os
import traceback
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

os.environ["EMLENS_COMPILE"] = "1"  # compile even tiny models' blocks, as emlens does for large ones

from emlens import TokenDataset, TrainConfig, evaluate_loss, train  # noqa: E402
from emlens.metrics import efficiency, mean_kl  # noqa: E402
from emlens.runner import runner_for  # noqa: E402
from emlens.runner.packed import Packing, flash_packed_attention, flash_usable  # noqa: E402
from emlens.runner.sampling import SamplingSettings, generate_batch  # noqa: E402
from emlens.scoring import nll_sum  # noqa: E402
from emlens.training import TrainingCaches  # noqa: E402
from tests.conftest import CONVERSATIONS  # noqa: E402
from tests.test_parity import (  # noqa: E402
    make_intervention,
    reference_edit,
    reference_kl,
    reference_loss,
    reference_step_backward,
    reference_train_steps,
)
from tests.tiny_archs import PROVED, tiny_pair  # noqa: E402

if not torch.cuda.is_available():
    raise RuntimeError("gpu_tests need a CUDA GPU; CI runs tests/ instead")

DEVICE = "cuda"
# relative tolerance of a mean loss, per dtype: float32 rounding, and bf16's 8-bit mantissa
LOSS_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
KINDS = ("resid_post", "mlp_out", "adapter")


@pytest.fixture(
    scope="module", params=[(a, d) for a in PROVED for d in (torch.float32, torch.bfloat16)], ids=lambda p: f"{p[0]}-{str(p[1])[6:]}"
)
def pair(request: Any) -> tuple[str, torch.dtype, Any, Any]:
    arch, dtype = request.param
    reference, bridge = tiny_pair(arch, device=DEVICE, dtype=dtype)
    return arch, dtype, reference, bridge


@pytest.fixture(scope="module")
def data(pair: Any) -> TokenDataset:
    return TokenDataset.from_conversations(pair[3].tokenizer, CONVERSATIONS, max_length=128)


def on_device(kind: str, bridge: Any) -> Any:
    return make_intervention(kind, bridge).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attention_equals_causal_attention_per_sequence(dtype: torch.dtype) -> None:
    """One flash kernel over packed sequences = causal attention of each sequence alone (float64 reference), values and gradients."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    lengths = [5, 17, 1, 33, 64]
    total, heads, kv_heads, dim = sum(lengths), 8, 2, 64
    q = torch.randn(1, heads, total, dim, device=DEVICE, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, device=DEVICE, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, device=DEVICE, generator=gen, dtype=dtype, requires_grad=True)
    assert flash_usable(q)
    out, _ = flash_packed_attention(
        torch.nn.Module(), q, k, v, None, scaling=dim**-0.5, emlens_packing=Packing.from_lengths(lengths, DEVICE)
    )
    grad_out = torch.randn(out.shape, device=DEVICE, generator=gen, dtype=dtype)
    (out * grad_out).sum().backward()

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    pieces, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        kk = k64[:, :, sl].repeat_interleave(heads // kv_heads, dim=1)
        vv = v64[:, :, sl].repeat_interleave(heads // kv_heads, dim=1)
        scores = q64[:, :, sl] @ kk.transpose(-1, -2) * dim**-0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
        pieces.append(scores.softmax(-1) @ vv)
        start += n
    expected = torch.cat(pieces, dim=2).transpose(1, 2)
    (expected * grad_out.double()).sum().backward()
    for got, want, name in ((out, expected, "output"), (q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        err = float((got.double() - want).norm() / want.norm())
        assert err < 1e-2, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_loss_and_sweep(pair: Any, data: TokenDataset, kind: str) -> None:
    arch, dtype, reference, bridge = pair
    intervention = on_device(kind, bridge)
    expected = reference_loss(reference, data, intervention)
    fast = evaluate_loss(bridge, data, intervention)
    plan = runner_for(bridge).last_plan
    assert plan is not None and plan.fast, plan
    hooked = evaluate_loss(bridge, data, intervention, cache_prefix=False)
    tol = LOSS_TOL[dtype]
    assert fast == pytest.approx(expected, rel=tol) and hooked == pytest.approx(expected, rel=tol), (fast, hooked, expected)
    norms = [0.0, intervention.norm * 1.5]
    got = efficiency(bridge, intervention, data, norms, batch_size=2, progress=False)
    want = [reference_loss(reference, data, None if n == 0 else intervention.scaled_to(n)) for n in norms]
    assert got == pytest.approx(want, rel=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_train_step_loss_and_gradient(pair: Any, data: TokenDataset, kind: str) -> None:
    arch, dtype, reference, bridge = pair
    batch = next(data.batches(4))
    runner = runner_for(bridge)
    intervention = on_device(kind, bridge)
    plan = runner.plan(intervention)
    assert plan.fast
    with runner.applied(intervention, plan):
        logits = runner.logits(batch, batch.scored_positions, intervention, plan)
        loss = nll_sum(logits, batch.scored_targets.to(DEVICE)) / batch.scored.sum()
    loss.backward()
    got = [p.grad.clone() for p in intervention.parameters()]
    intervention = on_device(kind, bridge)
    gpu_batch = batch.to(DEVICE)
    with reference_edit(reference, intervention):
        ref_logits = reference(input_ids=gpu_batch.input_ids, attention_mask=gpu_batch.attention_mask).logits
    expected = F.cross_entropy(ref_logits[:, :-1][gpu_batch.scored].float(), gpu_batch.input_ids[:, 1:][gpu_batch.scored])
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=LOSS_TOL[dtype])
    for g, e in zip(got, [p.grad for p in intervention.parameters()]):
        err = float((g - e).norm() / e.norm())
        assert err < (1e-3 if dtype == torch.float32 else 5e-2), f"{arch} {kind} gradient: relative error {err:.2e}"


def test_train_with_kl_first_step(pair: Any, data: TokenDataset) -> None:
    arch, dtype, reference, bridge = pair
    intervention = on_device("resid_post", bridge)
    expected_sft = reference_loss(reference, data, intervention)
    expected_kl = reference_kl(reference, data, intervention)
    config = TrainConfig(
        lr=1e-3, max_steps=1, batch_size=len(data), grad_accum=1, kl_weight=1.0, kl_batch_size=len(data), warmup_steps=0, progress=False
    )
    result = train(bridge, intervention, data, config, kl_dataset=data)
    assert "hooked" not in result.plan
    assert result.losses[0]["sft"] == pytest.approx(expected_sft, rel=LOSS_TOL[dtype])
    assert result.losses[0]["kl"] == pytest.approx(expected_kl, rel=1e-3 if dtype == torch.float32 else 0.1, abs=1e-5)
    assert mean_kl(bridge, intervention, data, batch_size=2) == pytest.approx(
        reference_kl(reference, data, intervention), rel=1e-3 if dtype == torch.float32 else 0.1, abs=1e-5
    )


@pytest.mark.parametrize("kind", ("resid_post", "adapter"))
def test_the_studys_other_sweeps_equal_plain_transformers(pair: Any, data: TokenDataset, kind: str) -> None:
    """The sweeps the study's numbers come from, on CUDA (packed, flash attention in bf16, compiled where on):
    stability's perturbed points, the pre-training KL of directions swept together (the prefix plan for adapters),
    and the preference margins' per-example NLLs, each against plain transformers with the edit."""
    from emlens.geometry import noise_seed
    from emlens.metrics import pretraining_significance, stability
    from emlens.runner.measure import example_nll_sweep

    arch, dtype, reference, bridge = pair
    tol = LOSS_TOL[dtype]
    kl_tol = dict(rel=1e-3 if dtype == torch.float32 else 0.1, abs=1e-5)
    intervention = on_device(kind, bridge)
    got = stability(bridge, intervention, data, [0.0, 0.3, 1.0], seeds=(5,), batch_size=2, progress=False)
    perturbed = [intervention.perturbed(e, torch.Generator().manual_seed(noise_seed(5))) for e in (0.3, 1.0)]
    assert list(got.losses[0]) == pytest.approx([reference_loss(reference, data, i) for i in [intervention, *perturbed]], rel=tol)
    assert got.base_loss == pytest.approx(reference_loss(reference, data, None), rel=tol)

    named = {"a": intervention, "b": make_intervention(kind, bridge, seed=1).to(DEVICE)}
    norms = [0.0, 1.0, 3.0]
    curves = pretraining_significance(bridge, named, data, norms, batch_size=2, progress=False)
    for name, direction in named.items():
        assert curves[name][0] == 0.0
        want = [reference_kl(reference, data, direction.scaled_to(n)) for n in norms[1:]]
        assert curves[name][1:] == pytest.approx(want, **kl_tol), (arch, name)

    points = [None, intervention]
    nll = example_nll_sweep(bridge, data, points, batch_size=3)
    assert runner_for(bridge).last_plan.fast
    for k, point in enumerate(points):
        for i in range(len(data)):
            assert float(nll[k, i]) == pytest.approx(reference_loss(reference, data.subset([i]), point), rel=tol), (arch, k, i)


@pytest.mark.parametrize("budget", [None, 12])
@pytest.mark.parametrize("kind", ("resid_post", "adapter"))
def test_train_steps_with_fused_micro_batches(pair: Any, data: TokenDataset, kind: str, budget: int | None, monkeypatch: Any) -> None:
    """Micro-batches and a KL batch fused into one forward (budget None) or several (12 tokens) train as plain
    transformers does one micro-batch at a time. float32: two whole AdamW steps end at the same parameters. bf16: the
    step's gradient (AdamW's first steps move each parameter by about ±lr whatever the gradient's size, so a component
    near zero whose sign bf16 rounding flips would dominate a comparison of parameters)."""
    import emlens.training

    arch, dtype, reference, bridge = pair
    if budget is not None:
        monkeypatch.setattr(emlens.training, "TRAIN_TOKENS_PER_FORWARD", budget)
    config = TrainConfig(
        lr=0.05, max_steps=2, batch_size=1, grad_accum=2, kl_weight=3.0, kl_batch_size=2, warmup_steps=0, progress=False, seed=4
    )
    if dtype == torch.float32:
        start = on_device(kind, bridge).flatten()
        got = on_device(kind, bridge)
        result = train(bridge, got, data, config, kl_dataset=data)
        assert "hooked" not in result.plan, result.plan
        want = reference_train_steps(reference, on_device(kind, bridge), data, config, DEVICE).flatten() - start
        err = float((got.flatten() - start - want).norm() / want.norm())
        assert err < 1e-3, f"{arch} {kind}: relative error {err:.2e} of the update"
        return
    runner = runner_for(bridge)
    got = on_device(kind, bridge)
    plan = runner.plan(got)
    caches = TrainingCaches.build(bridge, got, data, data, progress=False)
    micro = list(data.indexed_batches(1, shuffle=True, seed=config.seed))[: config.grad_accum]
    kl_item = next(data.indexed_batches(config.kl_batch_size, shuffle=True, seed=config.seed + 1))
    n_tokens = sum(int(b.scored.sum()) for _, b in micro)
    with runner.applied(got, plan):
        emlens.training._fused_step(
            runner, plan, got, micro, n_tokens, caches.sft, kl_item, caches.kl, config.kl_weight, emlens.training.train_tokens_per_forward()
        )
    ref = on_device(kind, bridge)
    reference_step_backward(reference, ref, [b.to(DEVICE) for _, b in micro], kl_item[1].to(DEVICE), config.kl_weight)
    for g, e in zip(got.parameters(), ref.parameters()):
        if e.grad is None:
            assert g.grad is None
            continue
        err = float((g.grad - e.grad).norm() / e.grad.norm())
        assert err < 5e-2, f"{arch} {kind} gradient: relative error {err:.2e}"


def test_greedy_sampling_equals_plain_generate(pair: Any) -> None:
    arch, dtype, reference, bridge = pair
    intervention = on_device("resid_post", bridge)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 61, 33, 12]], device=DEVICE)
    tokens = generate_batch(bridge, ids, torch.ones_like(ids), intervention, SamplingSettings(16, 0.0), seed=0)
    with torch.no_grad(), reference_edit(reference, intervention):
        expected = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=16,
            pad_token_id=bridge.tokenizer.pad_token_id,
            eos_token_id=None,
        )[:, ids.shape[1] :]
    eos = bridge.tokenizer.eos_token_id
    got, want = tokens[0].tolist(), expected[0].tolist()
    if eos in got:  # emlens stops at EOS and pads after it
        got = got[: got.index(eos) + 1]
        want = want[: len(got)]
    assert got == want


@pytest.mark.parametrize("kind", ("resid_post", "adapter"))
def test_graph_decoding_of_a_padded_batch_equals_plain_generate(pair: Any, kind: str, monkeypatch: Any) -> None:
    """CUDA-graph decoding (one graph per block of 4 cache slots, so several are captured) of a left-padded batch:
    float32: the same greedy tokens and logits as plain transformers' ``generate`` with the edit as a hook, and the same
    samples (same seed) at temperature 1; both dtypes: bit-equal to the same decoder run without graphs."""
    import emlens.runner.decoding as decoding
    from tests.test_parity import PADDED_PROMPTS, left_padded, reference_generate

    monkeypatch.setattr(decoding, "SLOT_BLOCK", 4)
    arch, dtype, reference, bridge = pair
    runner = runner_for(bridge)
    if not runner.arch.packable:
        pytest.skip("decoded by transformers' generate itself")
    intervention = on_device(kind, bridge)
    pad = bridge.tokenizer.pad_token_id
    ids, mask = (t.to(DEVICE) for t in left_padded(PADDED_PROMPTS, pad))
    for settings in (SamplingSettings(20, 0.0), SamplingSettings(20, 1.0)):
        tokens, logits = generate_batch(bridge, ids, mask, intervention, settings, seed=5, return_logits=True)
        assert "CUDA graph" in runner.last_plan.reason
        _without_graphs(monkeypatch)
        eager, eager_logits = generate_batch(bridge, ids, mask, intervention, settings, seed=5, return_logits=True)
        monkeypatch.undo()
        monkeypatch.setattr(decoding, "SLOT_BLOCK", 4)
        assert tokens.tolist() == eager.tolist() and torch.equal(logits, eager_logits)
        if dtype == torch.float32:
            want, want_logits = reference_generate(reference, intervention, ids, mask, settings, 5, pad, bridge.tokenizer.eos_token_id)
            assert tokens.tolist() == want.tolist()
            torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sampling_a_model_spread_over_two_gpus_equals_plain_generate(tmp_path: Any) -> None:
    """A model split over two GPUs by ``device_map`` decodes with transformers' ``generate`` (the slot cache lives on one
    device): greedy tokens with a steering vector equal plain transformers' on one GPU with the vector as a hook."""
    from emlens.models import load_model, tiny_hf_model
    from tests.test_parity import reference_edit

    hf, tok = tiny_hf_model("llama", seed=4)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    n = hf.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "lm_head": 0, "model.rotary_emb": 0, "model.norm": 1}
    device_map.update({f"model.layers.{i}": 0 if i < n // 2 else 1 for i in range(n)})
    bridge = load_model(str(tmp_path), dtype=torch.float32, device_map=device_map)
    runner = runner_for(bridge)
    assert len({p.device for p in runner.plain.parameters()}) == 2
    vector = make_intervention("resid_post", bridge).to("cuda:0")
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 61, 33, 12]], device="cuda:0")
    tokens = generate_batch(bridge, ids, torch.ones_like(ids), vector, SamplingSettings(16, 0.0), seed=0)
    assert "transformers' cached decoding" in runner.last_plan.reason
    reference = hf.to("cuda:0")
    with torch.no_grad(), reference_edit(reference, vector):
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
    assert tokens.tolist() == expected.tolist()


def test_a_step_that_cannot_be_captured_decodes_eagerly_with_a_warning(monkeypatch: Any) -> None:
    """A host sync inside the step (here forced into the rotary embedding) makes graph capture fail: decoding warns,
    goes on without graphs, and gives the tokens and logits of the decoder run without graphs from the start."""
    import emlens.runner.decoding as decoding

    reference, bridge = tiny_pair("qwen2", device=DEVICE)
    pad = bridge.tokenizer.pad_token_id
    from tests.test_parity import PADDED_PROMPTS, left_padded

    ids, mask = (t.to(DEVICE) for t in left_padded(PADDED_PROMPTS, pad))
    settings = SamplingSettings(12, 0.0)
    _without_graphs(monkeypatch)
    eager, eager_logits = generate_batch(bridge, ids, mask, None, settings, seed=0, return_logits=True)
    monkeypatch.undo()
    rotary = decoding.decoder_stack(runner_for(bridge).plain).rotary_emb
    original = type(rotary).forward

    def syncing(self: Any, x: Any, position_ids: Any, *args: Any, **kwargs: Any) -> Any:
        torch.cuda.synchronize()  # not allowed while a CUDA graph is being captured
        return original(self, x, position_ids, *args, **kwargs)

    sampled = SamplingSettings(12, 1.0)
    _without_graphs(monkeypatch)
    eager_sampled = generate_batch(bridge, ids, mask, None, sampled, seed=3)
    torch.manual_seed(9)
    eager_draw = torch.randn(5, device=DEVICE)
    monkeypatch.undo()
    monkeypatch.setattr(type(rotary), "forward", syncing)
    with pytest.warns(RuntimeWarning, match="without CUDA graphs"):
        tokens, logits = generate_batch(bridge, ids, mask, None, settings, seed=0, return_logits=True)
    assert tokens.tolist() == eager.tolist() and torch.equal(logits, eager_logits)
    # the failed capture leaves the device's random numbers usable: sampling at temperature 1 (its own fallback again)
    # and a plain draw give what they give where no capture was tried
    with pytest.warns(RuntimeWarning, match="without CUDA graphs"):
        assert generate_batch(bridge, ids, mask, None, sampled, seed=3).tolist() == eager_sampled.tolist()
    torch.manual_seed(9)
    assert torch.equal(torch.randn(5, device=DEVICE), eager_draw)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the capture stream did not stay current


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_decoding_a_model_on_a_gpu_that_is_not_current_equals_plain_generate(monkeypatch: Any) -> None:
    """A model on cuda:1 while cuda:0 is current: the step graphs are captured on the model's GPU (a capture stream on
    the current GPU would record none of its kernels, and replays would return the capture's logits every step).
    Greedy tokens and every step's logits equal plain generate on cuda:1, with no fallback warning."""
    import emlens.runner.decoding as decoding
    from tests.test_parity import PADDED_PROMPTS, left_padded, reference_generate

    monkeypatch.setattr(decoding, "SLOT_BLOCK", 4)
    assert torch.cuda.current_device() == 0
    reference, bridge = tiny_pair("qwen2", device="cuda:1")
    pad = bridge.tokenizer.pad_token_id
    ids, mask = (t.to("cuda:1") for t in left_padded(PADDED_PROMPTS, pad))
    intervention = make_intervention("resid_post", bridge).to("cuda:1")
    settings = SamplingSettings(12, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tokens, logits = generate_batch(bridge, ids, mask, intervention, settings, seed=5, return_logits=True)
    assert "slot-cache" in runner_for(bridge).last_plan.reason
    want, want_logits = reference_generate(reference, intervention, ids, mask, settings, 5, pad, bridge.tokenizer.eos_token_id)
    assert tokens.tolist() == want.tolist()
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


def _without_graphs(monkeypatch: Any) -> None:
    """Sampling decodes with the slot decoder's graphs off (every step eager) until ``monkeypatch.undo()``."""
    import functools

    import emlens.runner.decoding as decoding
    import emlens.runner.sampling as sampling

    monkeypatch.setattr(sampling, "decode", functools.partial(decoding.decode, graphs=False))


def test_compiled_blocks_do_not_recompile_for_new_batch_shapes() -> None:
    """After warming up, batches of other lengths and sizes reuse the compiled blocks (dynamic shapes, no host-side lengths in the graph)."""
    reference, bridge = tiny_pair("qwen2", device=DEVICE, dtype=torch.bfloat16)
    data = TokenDataset.from_conversations(bridge.tokenizer, CONVERSATIONS, max_length=128)
    vector = on_device("resid_post", bridge)
    config = TrainConfig(lr=1e-3, max_steps=2, batch_size=2, grad_accum=1, warmup_steps=0, progress=False)
    train(bridge, vector, data, config)
    evaluate_loss(bridge, data, vector, batch_size=3)
    torch._dynamo.config.error_on_recompile = True
    try:
        for batch_size in (1, 4, 5):
            train(
                bridge,
                on_device("resid_post", bridge),
                data,
                TrainConfig(lr=1e-3, max_steps=2, batch_size=batch_size, grad_accum=1, warmup_steps=0, progress=False),
            )
            evaluate_loss(bridge, data, vector, batch_size=batch_size)
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_training_step_reads_the_device_twice() -> None:
    """A step on the fast path waits on the GPU twice (losses and gradients before the update, parameters after it)."""
    _, bridge = tiny_pair("llama", device=DEVICE, dtype=torch.bfloat16)
    data = TokenDataset.from_conversations(bridge.tokenizer, CONVERSATIONS, max_length=128)
    vector = on_device("resid_post", bridge)
    caches = TrainingCaches.build(bridge, vector, data, progress=False)
    config = TrainConfig(lr=1e-3, max_steps=6, batch_size=2, grad_accum=2, warmup_steps=0, progress=False, checkpoint_every=100)
    train(bridge, vector, data, config, caches=caches)  # warm-up: compiles for every batch shape, pins host buffers
    where: list[list[str]] = [[]]
    original = warnings.showwarning

    def record(message: Any, *args: Any, **kwargs: Any) -> None:
        if "synchroniz" in str(message):
            frame = next((f for f in reversed(traceback.extract_stack()[:-1]) if "/emlens/" in f.filename), None)
            where[-1].append(f"{frame.filename.split('/emlens/')[-1]}:{frame.lineno}" if frame else "?")

    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            train(bridge, on_device("resid_post", bridge), data, config, caches=caches, on_step=lambda step, rec: where.append([]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = original
    # where[0]: set-up and step 1; where[-2]: the last step (its trajectory snapshot); in between, one list per step
    middle = where[1:-2]
    assert len(middle) == config.max_steps - 2
    assert all(len(w) == 2 for w in middle), middle


def test_every_saved_intervention_loads_onto_the_device_asked_for(tmp_path: Any) -> None:
    """``Intervention.load(path, "cuda")`` puts every kind's tensors on CUDA (a LoRA adapter stayed on the CPU)."""
    from emlens import Composed, Intervention, LoRAAdapter, MultiLayerSteering, RankOneAdapter, SteeringVector
    from emlens.interventions.ablation import DirectionAblation

    kinds = {
        "vector": SteeringVector(1, 64),
        "rank_one": RankOneAdapter(1, 64, 128),
        "lora": LoRAAdapter({"down": (128, 64), "q": (64, 64)}, [0, 1], rank=2),
        "multilayer": MultiLayerSteering([0, 1], 64),
        "ablation": DirectionAblation(torch.randn(64), ["blocks.1.hook_resid_post"]),
        "composed": Composed([SteeringVector(0, 64), LoRAAdapter({"down": (128, 64)}, [1])]),
    }
    for name, intervention in kinds.items():
        path = intervention.save(tmp_path / f"{name}.safetensors")
        loaded = Intervention.load(path, DEVICE)
        devices = {tensor.device.type for tensor in loaded.state_dict().values()}
        assert devices == {"cuda"}, (name, devices)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # packed and padded fast paths
def test_fast_paths_of_a_model_spread_over_two_gpus_equal_plain_transformers(arch: str, tmp_path: Any) -> None:
    """A model split over two GPUs by ``device_map`` (half its blocks on each; the edit's block on the first, the blocks
    above it across both): ``evaluate_loss``, efficiency, the KL and two training steps with KL on the fast paths equal
    plain transformers on one GPU with the same edit, in float32."""
    from emlens import RankOneAdapter, SteeringVector
    from emlens.models import load_model

    reference, built = tiny_pair(arch, seed=3)  # the plain model (a copy of the bridged one's weights) is saved and loaded split
    tok = built.tokenizer
    reference.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    n = reference.config.num_hidden_layers
    device_map: dict[str, Any] = {f"model.{name}": 0 for name, _ in reference.model.named_children() if name not in ("layers", "norm")}
    device_map.update({"lm_head": 0, "model.norm": 1, **{f"model.layers.{i}": 0 if i < n // 2 else 1 for i in range(n)}})
    bridge = load_model(str(tmp_path), dtype=torch.float32, device_map=device_map)
    runner = runner_for(bridge)
    assert len({p.device for p in runner.plain.parameters()}) == 2
    reference = reference.to("cuda:0")
    data = TokenDataset.from_conversations(tok, CONVERSATIONS, max_length=128)
    d = reference.config.hidden_size
    last = SteeringVector(n - 1, d, alpha=2.0, init=0.5 * torch.randn(d)).to("cuda:0")
    assert evaluate_loss(bridge, data, last) == pytest.approx(reference_loss(reference, data, last), rel=1e-4, abs=1e-5)  # only the norm above
    assert runner.last_plan is not None and runner.last_plan.fast, runner.last_plan
    # an adapter on the last block, which sits on the second GPU: its hook and every block run there
    on_second = RankOneAdapter.for_model(bridge, n - 1, alpha=4.0, seed=1)
    with torch.no_grad():
        on_second.b.copy_(0.5 * torch.randn(on_second.d_model))
    on_second = on_second.to("cuda:1")
    assert evaluate_loss(bridge, data, on_second) == pytest.approx(reference_loss(reference, data, on_second.to("cuda:0")), rel=1e-4, abs=1e-5)
    assert runner.last_plan is not None and runner.last_plan.fast, runner.last_plan
    got_kl = mean_kl(bridge, on_second.to("cuda:1"), data, batch_size=2)
    assert got_kl == pytest.approx(reference_kl(reference, data, on_second.to("cuda:0")), rel=1e-3, abs=1e-6)
    for kind in ("resid_post", "adapter"):
        intervention = make_intervention(kind, bridge).to("cuda:0")
        want = reference_loss(reference, data, intervention)
        assert evaluate_loss(bridge, data, intervention) == pytest.approx(want, rel=1e-4, abs=1e-5), kind
        assert runner.last_plan is not None and runner.last_plan.fast, runner.last_plan
        norms = [0.0, 1.5 * intervention.norm]
        want_eff = [reference_loss(reference, data, None), reference_loss(reference, data, intervention.scaled_to(norms[1]))]
        got_eff = efficiency(bridge, intervention, data, norms, batch_size=2, progress=False)
        assert got_eff == pytest.approx(want_eff, rel=1e-4, abs=1e-5), kind
        got_kl = mean_kl(bridge, intervention, data, batch_size=2)
        assert got_kl == pytest.approx(reference_kl(reference, data, intervention), rel=1e-3, abs=1e-6), kind
        config = TrainConfig(lr=0.05, batch_size=1, grad_accum=2, kl_weight=3.0, kl_batch_size=2, warmup_steps=0, progress=False, seed=4)
        got = make_intervention(kind, bridge).to("cuda:0")
        result = train(bridge, got, data, config, kl_dataset=data)
        assert "hooked" not in result.plan, result.plan
        ref = reference_train_steps(reference, make_intervention(kind, bridge).to("cuda:0"), data, config, "cuda:0")
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(got.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=f"{arch} {kind} {name}")
