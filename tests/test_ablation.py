"""DirectionAblation, Composed interventions and projecting a direction out of an adapter's B.

float32 on CPU, every proved architecture. References: plain transformers with the same edits
made by PyTorch forward hooks (ablation ``x − s(x·u)u`` at decoder layer outputs / layer 0's
input, vectors added there) and the real peft LoRA for adapters; for projecting ``u`` out of an
adapter's ``B``, the dense update ``(I − u uᵀ) ΔW`` applied by weight surgery.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from emlens import (
    Composed,
    DirectionAblation,
    Intervention,
    LoRAAdapter,
    MultiLayerSteering,
    RankOneAdapter,
    SteeringVector,
    TokenDataset,
    TrainConfig,
    cosine_similarity,
    evaluate_loss,
    project_out_of_adapter,
    train,
)
from emlens.interventions import InterventionError
from emlens.metrics import efficiency, pretraining_significance, stability
from emlens.runner import runner_for
from emlens.runner.sampling import SamplingSettings, generate_batch
from tests.tiny_archs import tiny_pair

TOL = dict(rel=1e-4, abs=1e-5)


# `pair` (a plain transformers model and a bridge of each proved architecture) and `data` come from conftest.py


def direction(d_model: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed))


@contextmanager
def hooks_on(reference: Any, edits: list[tuple[str, int, Any]]) -> Iterator[None]:
    """``(where, layer, fn)`` edits in order: ``"out"`` a decoder layer's output, ``"in"`` its input (fn: tensor → tensor)."""
    handles = []
    try:
        for where, layer, fn in edits:
            block = reference.model.layers[layer]
            if where == "out":
                handles.append(block.register_forward_hook(lambda m, a, out, fn=fn: fn(out)))
            else:

                def pre(m: Any, args: tuple, kwargs: dict, fn: Any = fn) -> Any:
                    if args:
                        return (fn(args[0]), *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

                handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def ablate(u: torch.Tensor, strength: float = 1.0) -> Any:
    unit = u / u.norm()
    return lambda x: x - strength * (x @ unit).unsqueeze(-1) * unit


def add(vec: torch.Tensor) -> Any:
    return lambda x: x + vec


def reference_loss(model: Any, data: TokenDataset) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.batches(2):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            scored = batch.scored
            total += float(F.cross_entropy(logits[:, :-1][scored], batch.input_ids[:, 1:][scored], reduction="sum"))
            count += int(scored.sum())
    return total / count


# --- ablation ----------------------------------------------------------------------------------------


def test_ablation_at_one_layer_and_everywhere_equals_reference(pair: Any, data: TokenDataset) -> None:
    arch, reference, bridge = pair
    u = direction(bridge.cfg.d_model)
    one = DirectionAblation.at_layer(u, 1)
    everywhere = DirectionAblation.everywhere(bridge, u)
    half = DirectionAblation.at_layers(u, [1, 2], strength=0.5)
    n = bridge.cfg.n_layers
    cases = [
        (one, [("out", 1, ablate(u))]),
        (everywhere, [("in", 0, ablate(u))] + [("out", x, ablate(u)) for x in range(n)]),
        (half, [("out", 1, ablate(u, 0.5)), ("out", 2, ablate(u, 0.5))]),
    ]
    for ablation, edits in cases:
        with hooks_on(reference, edits):
            expected = reference_loss(reference, data)
        fast = evaluate_loss(bridge, data, ablation)
        plan = runner_for(bridge).last_plan
        if ablation is everywhere and not runner_for(bridge).arch.packable:
            # block 0's input has no plain site where blocks run padded (Gemma): the hooked path, and it says why
            assert plan.path == "hooked" and "blocks.0.hook_resid_pre" in plan.reason, plan
        else:
            assert plan.path == "prefix" and plan.cut == ablation.layer, plan
        assert fast == pytest.approx(expected, **TOL)
        assert evaluate_loss(bridge, data, ablation, cache_prefix=False) == pytest.approx(expected, **TOL)
    assert abs(evaluate_loss(bridge, data, everywhere) - reference_loss(reference, data)) > 1e-4  # it acts


def test_ablation_removes_the_direction(pair: Any) -> None:
    """After every ablated hook the residual has no component along u (and sampling sees the same edit)."""
    arch, reference, bridge = pair
    u = direction(bridge.cfg.d_model)
    ablation = DirectionAblation.everywhere(bridge, u)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 61]])
    seen = []
    with ablation.applied(bridge), bridge.hooks(fwd_hooks=[(h, lambda act, hook: seen.append(act.detach())) for h in ablation.hooks]):
        bridge(ids)
    unit = u / u.norm()
    assert len(seen) == len(ablation.hooks) and all(float((act @ unit).abs().max()) < 1e-4 for act in seen)
    tokens, logits = generate_batch(bridge, ids, torch.ones_like(ids), ablation, SamplingSettings(6, 0.0), seed=0, return_logits=True)
    edits = [("in", 0, ablate(u))] + [("out", x, ablate(u)) for x in range(bridge.cfg.n_layers)]
    with torch.no_grad(), hooks_on(reference, edits):
        expected = reference(input_ids=torch.cat([ids, tokens], dim=1)).logits[0, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(logits[: tokens.shape[1], 0], expected[: tokens.shape[1]], rtol=1e-4, atol=1e-4)


def test_ablation_geometry_and_saving(tmp_path: Any) -> None:
    u = direction(64)
    ablation = DirectionAblation.at_layers(u, [1, 3], strength=1.0, model_name="m")
    assert ablation.norm == pytest.approx(1.0) and float(ablation.direction.norm()) == pytest.approx(1.0)
    assert ablation.scaled_to(0.25).strength == 0.25 and ablation.scaled_to(0.25).norm == pytest.approx(0.25)
    noisy = ablation.perturbed(0.6, torch.Generator().manual_seed(1))
    assert float(noisy.direction.norm()) == pytest.approx(1.0, abs=1e-6)
    # the geometry is that of the projection s·u uᵀ: cosine (u·u')² = (√(1−ε²))² = 0.64
    assert cosine_similarity(noisy, ablation) == pytest.approx(0.64, abs=1e-5)
    flipped = ablation.with_direction(-ablation.direction)  # ablates exactly as u does
    assert cosine_similarity(flipped, ablation) == pytest.approx(1.0, abs=1e-6)
    assert float(flipped.flatten() @ ablation.flatten()) == pytest.approx(ablation.inner(flipped), rel=1e-5)
    rand = ablation.random_like(2)
    assert rand.norm == pytest.approx(1.0) and rand.hooks == ablation.hooks
    # the Gram matrix from the directions equals the flattened projections' dot products
    items = [ablation, noisy.scaled_to(0.5), flipped, rand]
    flat = torch.stack([i.flatten().double() for i in items])
    torch.testing.assert_close(DirectionAblation.gram(items), flat @ flat.T, rtol=1e-6, atol=1e-9)
    assert ablation.inner(ablation.scaled_to(2.0)) == pytest.approx(2.0)
    loaded = Intervention.load(ablation.save(tmp_path / "abl.safetensors"))
    assert isinstance(loaded, DirectionAblation) and loaded.metadata() == ablation.metadata()
    torch.testing.assert_close(loaded.direction, ablation.direction)
    with pytest.raises(InterventionError, match="zero"):
        DirectionAblation.at_layer(torch.zeros(64), 1)
    with pytest.raises(InterventionError, match="per-layer"):
        DirectionAblation(u, ["hook_embed"])


# --- composition -----------------------------------------------------------------------------------


def test_composed_ablation_then_steering_equals_reference(pair: Any, data: TokenDataset) -> None:
    """Ablate u at every block's output and add a vector at layer 2's (after that layer's ablation): a + b, trained jointly."""
    arch, reference, bridge = pair
    u = direction(bridge.cfg.d_model)
    d = bridge.cfg.d_model
    vector = SteeringVector(2, d, alpha=2.0, init=0.3 * torch.randn(d, generator=torch.Generator().manual_seed(8)))
    ablation = DirectionAblation.at_layers(u, range(bridge.cfg.n_layers))
    both = ablation + vector
    assert isinstance(both, Composed) and both.members() == [ablation, vector]
    edits = [("out", x, ablate(u)) for x in range(bridge.cfg.n_layers)] + [("out", 2, add(vector.effective.detach()))]
    with hooks_on(reference, edits):
        expected = reference_loss(reference, data)
    assert evaluate_loss(bridge, data, both) == pytest.approx(expected, **TOL)
    assert runner_for(bridge).last_plan.path == "prefix"
    assert evaluate_loss(bridge, data, both, cache_prefix=False) == pytest.approx(expected, **TOL)
    config = TrainConfig(lr=1e-2, max_steps=2, batch_size=len(data), grad_accum=1, warmup_steps=0, progress=False)
    start = vector.vector.detach().clone()
    result = train(bridge, both, data, config)
    assert result.losses[0]["sft"] == pytest.approx(expected, **TOL)
    assert not torch.equal(start, vector.vector.detach())  # the steering part trained; the ablation has no parameters
    assert torch.equal(ablation.direction, u / u.norm())


def test_norm_zero_of_a_composition_keeps_the_parts_that_do_not_rescale(pair: Any, data: TokenDataset) -> None:
    """Rescaling ``ablation + vector`` moves the vector only, so the sweeps' norm 0 is the ablation alone, not the bare
    model: efficiency's first point, stability's base loss and the pre-training KL at 0 equal plain transformers with
    only the ablation's hooks."""
    arch, reference, bridge = pair
    d = bridge.cfg.d_model
    u = direction(d)
    vector = SteeringVector(2, d, alpha=2.0, init=0.3 * torch.randn(d, generator=torch.Generator().manual_seed(8)))
    both = DirectionAblation.at_layer(u, 1) + vector
    with hooks_on(reference, [("out", 1, ablate(u))]):
        ablated = reference_loss(reference, data)
    with hooks_on(reference, [("out", 1, ablate(u)), ("out", 2, add(vector.effective.detach()))]):
        full = reference_loss(reference, data)
    assert abs(ablated - reference_loss(reference, data)) > 1e-4  # the ablation acts
    assert efficiency(bridge, both, data, [0.0, vector.norm], batch_size=2, progress=False) == pytest.approx([ablated, full], **TOL)
    assert stability(bridge, both, data, [0.0, 0.5], seeds=(1,), batch_size=2, progress=False).base_loss == pytest.approx(ablated, **TOL)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.batches(2):
            real = batch.attention_mask.bool()
            base = F.log_softmax(reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[real], -1)
            with hooks_on(reference, [("out", 1, ablate(u))]):
                edited = F.log_softmax(reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[real], -1)
            total += float((base.exp() * (base - edited)).sum())
            count += int(real.sum())
    kl = pretraining_significance(bridge, {"both": both}, data, [0.0, vector.norm], batch_size=2, progress=False)["both"]
    assert kl[0] == pytest.approx(total / count, rel=1e-3, abs=1e-6) and kl[0] > 1e-4
    # a composition whose every part rescales still starts at the bare model
    assert (vector + SteeringVector(1, d, init=torch.ones(d))).at_norm(0.0) is None and both.at_norm(0.0) is not None


def test_composed_adapter_and_multilayer_steering_equal_peft_plus_hooks(pair: Any, data: TokenDataset) -> None:
    from tests.test_lora import load_factors, make_lora, require

    peft = require("peft")

    arch, reference, bridge = pair
    lora = make_lora(bridge, "qv-r2-plain")
    steering = MultiLayerSteering([0, 3], bridge.cfg.d_model, alpha=1.0, init=0.4 * torch.randn(2, bridge.cfg.d_model))
    both = sum([lora, steering])
    assert isinstance(both, Composed) and runner_for(bridge).plan(both).cut == 0
    twin = peft.get_peft_model(
        copy.deepcopy(reference),
        peft.LoraConfig(r=2, lora_alpha=lora.alpha, target_modules=["q_proj", "v_proj"], layers_to_transform=[2], lora_dropout=0.0),
    )
    load_factors(twin, lora)
    edits = [("out", 0, add(steering.vector_at(0))), ("out", 3, add(steering.vector_at(3)))]
    with hooks_on(twin.base_model.model, edits):
        expected = reference_loss(twin, data)
    assert evaluate_loss(bridge, data, both) == pytest.approx(expected, **TOL)
    assert evaluate_loss(bridge, data, both, cache_prefix=False) == pytest.approx(expected, **TOL)


def test_composed_offsets_take_the_offset_path(pair: Any, data: TokenDataset) -> None:
    arch, reference, bridge = pair
    d = bridge.cfg.d_model
    a = SteeringVector(1, d, alpha=1.0, init=0.3 * torch.randn(d))
    b = SteeringVector(1, d, hook="mlp_out", alpha=1.0, init=0.3 * torch.randn(d))  # another hook: no single offset
    c = SteeringVector(1, d, alpha=1.0, init=0.3 * torch.randn(d))
    assert runner_for(bridge).plan(a + c).path == "offset"
    assert runner_for(bridge).plan(a + b).path == "prefix"
    summed = SteeringVector.from_vector((a.effective + c.effective).detach(), 1)
    assert evaluate_loss(bridge, data, a + c) == pytest.approx(evaluate_loss(bridge, data, summed), **TOL)


def test_composed_geometry_saving_and_disabling(tmp_path: Any) -> None:
    _, bridge = tiny_pair("llama")
    d = bridge.cfg.d_model
    vector = SteeringVector(1, d, alpha=2.0, init=torch.randn(d))
    multi = MultiLayerSteering([0, 2], d, alpha=1.0, init=torch.randn(2, d))
    ablation = DirectionAblation.at_layer(direction(d), 3, strength=1.0)
    x = Composed([vector, multi, ablation])
    # the ablation is no size: the composition's geometry is that of its two vectors, and rescaling, noise and the
    # random counterpart leave the ablation as it is ("solution + ablation" swept over the solution's norm)
    assert x.norm == pytest.approx(math.sqrt(vector.norm**2 + multi.norm**2), rel=1e-6)
    assert x.inner(x) == pytest.approx(float(x.flatten() @ x.flatten()), rel=1e-5)
    y = x.random_like(4)
    assert x.inner(y) == pytest.approx(vector.inner(y.members()[0]) + multi.inner(y.members()[1]), rel=1e-6)
    # baselines k and k + 1 share no draw (part seeds seed + i gave random k's part 1 the draw of random k+1's part 0)
    pair_of_vectors = Composed([vector, SteeringVector(2, d, alpha=2.0, init=torch.randn(d))])
    first, second = pair_of_vectors.random_like(4), pair_of_vectors.random_like(5)
    assert abs(cosine_similarity(first.members()[1], second.members()[0])) < 0.5
    assert abs(cosine_similarity(first.members()[0], second.members()[0])) < 0.5
    scaled = x.scaled_to(2 * x.norm)
    assert scaled.norm == pytest.approx(2 * x.norm, rel=1e-5) and cosine_similarity(scaled, x) == pytest.approx(1.0, abs=1e-6)
    noisy = x.perturbed(0.5, torch.Generator().manual_seed(2))
    assert [p.kind for p in noisy] == [p.kind for p in x]
    for changed in (y, scaled, noisy, x.scaled_to(0.0)):
        kept = changed.members()[2]
        assert kept.strength == 1.0 and kept is not ablation
        torch.testing.assert_close(kept.direction, ablation.direction, rtol=0, atol=1e-7)  # a copy (re-normalised)
    assert cosine_similarity(noisy.members()[0], vector) == pytest.approx(math.sqrt(1 - 0.25), abs=1e-5)  # the vectors moved
    only = Composed([ablation, DirectionAblation.at_layer(direction(d), 1, strength=0.5)])  # no sized part: all count
    assert only.norm == pytest.approx(math.sqrt(1.0 + 0.25), rel=1e-6)
    assert only.scaled_to(2 * only.norm).members()[0].strength == pytest.approx(2.0, rel=1e-6)
    loaded = Intervention.load(x.save(tmp_path / "composed.safetensors"))
    assert isinstance(loaded, Composed) and loaded.metadata() == x.metadata()
    torch.testing.assert_close(loaded.flatten(), x.flatten())
    ids = torch.tensor([[3, 4, 5, 6]])
    base = bridge(ids)
    with x.applied(bridge):
        assert not torch.allclose(bridge(ids), base)
        with x.disabled():
            torch.testing.assert_close(bridge(ids), base, rtol=0, atol=0)
        with pytest.raises(InterventionError, match="already applied"):
            with vector.applied(bridge):
                pass
    with pytest.raises(InterventionError, match="twice"):
        Composed([vector, vector])
    nested = Composed([Composed([vector, multi]), ablation])
    assert nested.members() == [vector, multi, ablation]


def test_steering_vectors_at_one_layer_combine_as_their_sum() -> None:
    d = 16
    e1, e2, e3 = (SteeringVector(layer, d, alpha=2.0, init=torch.randn(d)) for layer in (2, 2, 3))
    multi = MultiLayerSteering.from_steering_vectors([e1, e2, e3])
    assert multi.layers == [2, 3]
    torch.testing.assert_close(multi.vector_at(2), e1.effective + e2.effective)  # both act there: their sum, not the last
    torch.testing.assert_close(multi.vector_at(3), e3.effective)


@pytest.mark.parametrize("alpha", (-3.0, 3.0))
def test_an_adapters_size_does_not_depend_on_the_sign_of_alpha(alpha: float) -> None:
    rank_one = RankOneAdapter(1, 8, 12, alpha=alpha, seed=0)
    with torch.no_grad():
        rank_one.b.copy_(torch.randn(8))
    size = abs(alpha) * float(rank_one.a.detach().norm() * rank_one.b.detach().norm())
    assert rank_one.norm == pytest.approx(size, rel=1e-6)  # a negative alpha flips the update, it is no negative size
    doubled = rank_one.scaled_to(2 * size)
    assert doubled.norm == pytest.approx(2 * size, rel=1e-5)
    torch.testing.assert_close(doubled.delta_weight(), 2 * rank_one.delta_weight())  # same direction, not flipped
    lora = LoRAAdapter.from_rank_one(rank_one)
    assert lora.norm == pytest.approx(size, rel=1e-5) and all(n > 0 for n in lora.module_norms().values())
    layer, proj = lora.sites()[0]
    torch.testing.assert_close(lora.scaled_to(2 * size).delta_weight(layer, proj), 2 * lora.delta_weight(layer, proj))


# --- a direction projected out of an adapter's B -------------------------------------------------------


@pytest.mark.parametrize("renormalize", (False, True))
def test_projecting_out_of_a_rank_one_adapter(pair: Any, data: TokenDataset, renormalize: bool) -> None:
    arch, reference, bridge = pair
    adapter = RankOneAdapter.for_model(bridge, 1, alpha=4.0, seed=1)
    with torch.no_grad():
        adapter.b.copy_(torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(2)))
    u = direction(bridge.cfg.d_model)
    unit = u / u.norm()
    projected = project_out_of_adapter(adapter, u, renormalize=renormalize)
    dense = adapter.delta_weight() - torch.outer(unit, unit @ adapter.delta_weight())
    if renormalize:
        dense = dense * (adapter.norm / float(dense.norm()))
        assert projected.norm == pytest.approx(adapter.norm, rel=1e-5)
    torch.testing.assert_close(projected.delta_weight(), dense, rtol=1e-5, atol=1e-6)
    assert float((unit @ projected.delta_weight()).abs().max()) < 1e-5
    surgery = copy.deepcopy(reference)
    with torch.no_grad():
        surgery.model.layers[1].mlp.down_proj.weight += dense
    assert evaluate_loss(bridge, data, projected) == pytest.approx(reference_loss(surgery, data), **TOL)


def test_projecting_out_of_a_lora_adapter() -> None:
    from tests.test_lora import make_lora

    _, bridge = tiny_pair("qwen2")
    lora = make_lora(bridge, "all7-r3")
    u = direction(bridge.cfg.d_model)
    unit = u / u.norm()
    for renormalize in (False, True):
        projected = project_out_of_adapter(lora, u, renormalize=renormalize)
        for layer, proj in lora.sites():
            before, after = lora.delta_weight(layer, proj), projected.delta_weight(layer, proj)
            if proj in ("o", "down"):
                expected = before - torch.outer(unit, unit @ before)
                if renormalize:
                    expected = expected * (float(before.norm()) / float(expected.norm()))
                torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-6)
                assert float((unit @ after).abs().max()) < 1e-5
            else:
                torch.testing.assert_close(after, before)  # q k v gate up do not write to the residual: untouched
    only_o = project_out_of_adapter(lora, u, modules=["o"])
    torch.testing.assert_close(only_o.delta_weight(1, "down"), lora.delta_weight(1, "down"))
    with pytest.raises(InterventionError, match="writes width"):
        project_out_of_adapter(lora, torch.randn(2 * bridge.cfg.d_model), modules=["o"])
    with pytest.raises(InterventionError, match="only adapters"):
        project_out_of_adapter(SteeringVector(1, bridge.cfg.d_model), u)
    assert isinstance(project_out_of_adapter(LoRAAdapter.from_rank_one(RankOneAdapter.for_model(bridge, 1)), u), LoRAAdapter)
