"""MultiLayerSteering equals plain transformers with the same vectors added by PyTorch hooks.

float32 on CPU, every proved architecture (tests/tiny_archs.py). The reference adds ``alpha·v_L``
to decoder layer L's output (``hook_resid_post``) or to what its MLP adds to the residual
(``hook_mlp_out``: after Gemma's post-feedforward norm) with forward hooks on a separate copy of
the weights. Compared on the fast (prefix) path and the hooked path: loss, gradient, logits while
sampling, ``evaluate_loss``, ``train`` (with KL), efficiency and the pre-training KL; then the
geometry, saving, and the single-layer case (offset path, same as a SteeringVector).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from emlens import Intervention, MultiLayerSteering, SteeringVector, TokenDataset, TrainConfig, cosine_similarity, evaluate_loss, train
from emlens.interventions import InterventionError
from emlens.metrics import efficiency, mean_kl
from emlens.runner import runner_for
from emlens.runner.sampling import SamplingSettings, generate_batch
from emlens.scoring import nll_sum
from tests.conftest import CONVERSATIONS
from tests.tiny_archs import tiny_pair

TOL = dict(rel=1e-4, abs=1e-5)
LAYERS = (1, 3)


# `pair` (a plain transformers model and a bridge of each proved architecture) and `data` come from conftest.py


def make_steering(bridge: Any, hook: str = "resid_post", layers: tuple[int, ...] = LAYERS, seed: int = 0) -> MultiLayerSteering:
    gen = torch.Generator().manual_seed(seed)
    init = 0.5 * torch.randn(len(layers), bridge.cfg.d_model, generator=gen)
    return MultiLayerSteering(list(layers), bridge.cfg.d_model, hook=hook, alpha=2.0, init=init)


@contextmanager
def reference_edit(reference: Any, steering: MultiLayerSteering | None) -> Iterator[None]:
    """``alpha·v_L`` added by forward hooks: to decoder layer L's output, or to its MLP's contribution to the residual."""
    handles = []
    try:
        for layer in steering.layers if steering is not None else []:
            block = reference.model.layers[layer]
            module = getattr(block, "post_feedforward_layernorm", block.mlp) if steering.hook_template == "mlp_out" else block
            vec = steering.effective[steering.layers.index(layer)]
            handles.append(module.register_forward_hook(lambda m, a, out, vec=vec: out + vec))
        yield
    finally:
        for handle in handles:
            handle.remove()


def reference_loss(reference: Any, data: TokenDataset, steering: MultiLayerSteering | None) -> float:
    total, count = 0.0, 0
    with torch.no_grad(), reference_edit(reference, steering):
        for batch in data.batches(2):
            logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            scored = batch.scored
            total += float(F.cross_entropy(logits[:, :-1][scored], batch.input_ids[:, 1:][scored], reduction="sum"))
            count += int(scored.sum())
    return total / count


def reference_kl(reference: Any, data: TokenDataset, steering: MultiLayerSteering) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.batches(2):
            real = batch.attention_mask.bool()
            p = F.log_softmax(reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[real], -1)
            with reference_edit(reference, steering):
                q = F.log_softmax(reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[real], -1)
            total += float((p.exp() * (p - q)).sum())
            count += int(real.sum())
    return total / count


@pytest.mark.parametrize("hook", ("resid_post", "mlp_out"))
def test_loss_gradient_and_logits_equal_reference(pair: Any, data: TokenDataset, hook: str) -> None:
    arch, reference, bridge = pair
    batch = next(data.batches(4))
    expected_steering = make_steering(bridge, hook)
    with reference_edit(reference, expected_steering):
        logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = F.cross_entropy(logits[:, :-1][batch.scored], batch.input_ids[:, 1:][batch.scored])
    loss.backward()
    runner = runner_for(bridge)
    for fast in (True, False):
        steering = make_steering(bridge, hook)
        plan = runner.plan(steering, cache_prefix=fast)
        assert plan.path == ("prefix" if fast else "hooked") and (not fast or plan.cut == LAYERS[0]), plan
        with runner.applied(steering, plan):
            got_logits = runner.logits(batch, batch.scored_positions, steering, plan)
            got = nll_sum(got_logits, batch.scored_targets) / batch.scored.sum()
        got.backward()
        torch.testing.assert_close(got_logits.detach(), logits[batch.scored_positions].detach(), rtol=1e-4, atol=1e-5)
        assert float(got.detach()) == pytest.approx(float(loss.detach()), **TOL)
        torch.testing.assert_close(steering.vectors.grad, expected_steering.vectors.grad, rtol=1e-3, atol=1e-6)


def test_evaluate_loss_train_and_sweeps_equal_reference(pair: Any, data: TokenDataset) -> None:
    arch, reference, bridge = pair
    steering = make_steering(bridge)
    expected = reference_loss(reference, data, steering)
    assert evaluate_loss(bridge, data, steering) == pytest.approx(expected, **TOL)
    assert runner_for(bridge).last_plan.path == "prefix"
    assert evaluate_loss(bridge, data, steering, cache_prefix=False) == pytest.approx(expected, **TOL)
    norms = [0.0, steering.norm * 1.5]
    got = efficiency(bridge, steering, data, norms, batch_size=4, progress=False)
    assert got == pytest.approx([reference_loss(reference, data, None), reference_loss(reference, data, steering.scaled_to(norms[1]))], **TOL)
    expected_kl = reference_kl(reference, data, steering)
    assert mean_kl(bridge, steering, data, batch_size=4) == pytest.approx(expected_kl, rel=1e-3, abs=1e-7)
    for cache_prefix in (True, False):
        config = TrainConfig(
            lr=1e-3, max_steps=1, batch_size=len(data), grad_accum=1, kl_weight=1.0, kl_batch_size=len(data),
            warmup_steps=0, progress=False, cache_prefix=cache_prefix,
        )  # fmt: skip
        result = train(bridge, make_steering(bridge), data, config, kl_dataset=data)
        assert ("hooked" in result.plan) != cache_prefix
        assert result.losses[0]["sft"] == pytest.approx(expected, **TOL)
        assert result.losses[0]["kl"] == pytest.approx(expected_kl, rel=1e-3, abs=1e-6)


def test_sampling_next_token_logits_equal_reference(pair: Any) -> None:
    arch, reference, bridge = pair
    steering = make_steering(bridge)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 61, 33, 12]])
    tokens, logits = generate_batch(bridge, ids, torch.ones_like(ids), steering, SamplingSettings(10, 0.0), seed=0, return_logits=True)
    with torch.no_grad(), reference_edit(reference, steering):
        expected = reference(input_ids=torch.cat([ids, tokens], dim=1)).logits[0, ids.shape[1] - 1 : -1]
    steps = tokens.shape[1]
    torch.testing.assert_close(logits[:steps, 0], expected[:steps], rtol=1e-4, atol=1e-4)


def test_trained_jointly_from_zero() -> None:
    """From the paper's zero start, train() moves every layer's vector, the same on both paths."""
    _, bridge = tiny_pair("llama")
    data = TokenDataset.from_conversations(bridge.tokenizer, CONVERSATIONS, max_length=128)
    trained = []
    for cache_prefix in (True, False):
        steering = MultiLayerSteering.for_model(bridge, [0, 2, 3], alpha=2.0)
        config = TrainConfig(lr=1e-2, max_steps=3, batch_size=2, grad_accum=1, warmup_steps=0, progress=False, cache_prefix=cache_prefix)
        train(bridge, steering, data, config)
        assert all(n > 0 for n in steering.layer_norms().values())
        trained.append(steering.vectors.detach())
    torch.testing.assert_close(trained[0], trained[1], rtol=1e-3, atol=1e-6)


# --- one layer: the offset path and the same numbers as a SteeringVector ----------------------------------


def test_one_layer_is_a_steering_vector(data: TokenDataset, pair: Any) -> None:
    arch, reference, bridge = pair
    vector = SteeringVector(2, bridge.cfg.d_model, alpha=2.0, init=0.3 * torch.randn(bridge.cfg.d_model))
    steering = MultiLayerSteering.from_steering_vectors([vector])
    assert runner_for(bridge).plan(steering).path == "offset"
    assert evaluate_loss(bridge, data, steering) == pytest.approx(evaluate_loss(bridge, data, vector), **TOL)
    two = MultiLayerSteering.from_steering_vectors([vector, SteeringVector(0, bridge.cfg.d_model, init=torch.ones(bridge.cfg.d_model))])
    assert two.layers == [0, 2] and torch.equal(two.vector_at(2), vector.effective.detach())


# --- geometry and saving --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny_pair("llama")[1]


def test_geometry(llama: Any) -> None:
    x, y = make_steering(llama, seed=0), make_steering(llama, seed=1)
    flat = x.effective.detach().flatten()
    assert x.norm == pytest.approx(float(flat.norm()), rel=1e-6)
    assert x.inner(y) == pytest.approx(float(flat @ y.effective.detach().flatten()), rel=1e-5)
    assert x.inner(x) == pytest.approx(x.norm**2, rel=1e-5)
    assert cosine_similarity(x, y) == pytest.approx(float(F.cosine_similarity(flat, y.flatten(), dim=0)), abs=1e-6)
    half = x.scaled_to(x.norm / 2)
    torch.testing.assert_close(half.effective, x.effective / 2)
    rand = x.random_like(3)
    assert list(rand.layer_norms().values()) == pytest.approx(list(x.layer_norms().values()), rel=1e-5)
    eps = 0.7
    noisy = x.perturbed(eps, torch.Generator().manual_seed(11))  # not 0: make_steering drew x from seed 0
    assert noisy.norm == pytest.approx(x.norm, rel=1e-5)
    for row, new in zip(x.effective.detach(), noisy.effective.detach()):  # every layer rotated by the same angle, norm kept
        assert float(new.norm()) == pytest.approx(float(row.norm()), rel=1e-5)
        assert float(F.cosine_similarity(row, new, dim=0)) == pytest.approx(math.sqrt(1 - eps**2), abs=1e-5)
    assert cosine_similarity(noisy, x) == pytest.approx(math.sqrt(1 - eps**2), abs=1e-5)
    with pytest.raises(InterventionError):
        MultiLayerSteering.for_model(llama, [1]).scaled_to(1.0)
    with pytest.raises(InterventionError):
        x.inner(make_steering(llama, layers=(0, 1)))


def test_save_load_and_checks(tmp_path: Any, llama: Any) -> None:
    steering = make_steering(llama, hook="mlp_out")
    loaded = Intervention.load(steering.save(tmp_path / "ml.safetensors"))
    assert isinstance(loaded, MultiLayerSteering) and loaded.metadata() == steering.metadata()
    torch.testing.assert_close(loaded.effective, steering.effective)
    assert loaded.hook_names() == ["blocks.1.hook_mlp_out", "blocks.3.hook_mlp_out"]
    everywhere = MultiLayerSteering.for_model(llama, "all")
    assert everywhere.layers == [0, 1, 2, 3] and everywhere.norm == 0
    with pytest.raises(InterventionError, match="out of range"):
        MultiLayerSteering.for_model(llama, [4])
    with pytest.raises(InterventionError, match="distinct"):
        MultiLayerSteering([1, 1], 64)
    with pytest.raises(InterventionError, match="shape"):
        MultiLayerSteering([1, 2], 64, init=torch.zeros(3, 64))
    wide = MultiLayerSteering([1], 65)
    with pytest.raises(InterventionError, match="width"):
        wide.check_model(llama)
