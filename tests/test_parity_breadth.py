"""Whole training runs and left-padded decoding of the other interventions equal plain transformers.

tests/test_parity.py proves the paper's two interventions (a steering vector and a rank-1 adapter) over whole runs and
in batched decoding; the other interventions' own test files prove their losses, gradients, first training step and
single-row decoding. This file closes the gap, float32 on CPU, every proved architecture:

- several AdamW steps of ``train`` (micro-batches fused into one forward, a KL term, warm-up and decay, on the fast
  path and on the hooked path) end where the same steps end on plain transformers doing one micro-batch per forward:
  a rank-3 ``LoRAAdapter`` on all seven projections of two layers (the reference: the real peft LoRA), a
  ``MultiLayerSteering`` (forward hooks), an ablation composed with a steering vector, and a LoRA adapter composed
  with multi-layer steering (peft plus hooks);
- tokens and every step's logits of a left-padded batch equal plain ``generate`` with the same edits, for the same
  interventions;
- activations read under an intervention (``collect_activations``) equal a forward hook on plain transformers;
- the padded fast path, which Gemma's architectures always take, on the Llama-family architectures that usually pack
  (as when a model is loaded with an attention implementation emlens cannot pack).

The base model of the KL term is the model with the whole intervention off (a composition's ablation included).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
import torch

from emlens import DirectionAblation, MultiLayerSteering, SteeringVector, TokenDataset, TrainConfig, evaluate_loss, train
from emlens.metrics import efficiency, mean_kl
from emlens.runner import runner_for
from emlens.runner.sampling import SamplingSettings, generate_batch
from tests.conftest import CONVERSATIONS
from tests.test_ablation import ablate, direction, hooks_on
from tests.test_lora import make_lora, peft_modules, peft_twin, require
from tests.test_multilayer import make_steering
from tests.test_parity import KINDS, LAYER, PADDED_PROMPTS, left_padded, make_intervention, reference_edit, reference_train_steps
from tests.tiny_archs import PROVED, tiny_pair

require("peft", allow_module_level=True)

STEPS = dict(
    lr=0.05, batch_size=1, grad_accum=2, kl_weight=3.0, kl_batch_size=2, warmup_steps=0, progress=False, seed=4
)  # one epoch: 2 steps
# AdamW's update is lr·m/(√v + eps): with the default eps (1e-8) a component whose gradient is near 1e-8 turns a
# float32 rounding difference between two exact computations into a visible part of a step (seen: gradients equal to
# 3e-6 relative, parameters off by 4% of lr after one step, on Gemma 3 with a rank-3 LoRA). Both sides train with
# eps = 1e-3, where the update is a smooth function of the gradient (its size matters too, not only its sign), so the
# comparison is tight and still sees a wrong gradient.
ADAM_EPS = 1e-3
# after two steps the parameters differ by rounding only: at most 1.3e-5 seen (Gemma 3, no KL), against moves of
# 0.03-0.075; a wrong base model for the KL term (the composition's ablation left on) moves them by 1.4e-2
PARAM_ATOL = 5e-5


# `pair` (a plain transformers model and a bridge of each proved architecture) and `data` come from conftest.py


def plus(vector: SteeringVector) -> Any:
    scaled = vector.alpha * vector.vector  # the documented edit, written out (not emlens' own .effective)
    return lambda x: x + scaled


def added_per_layer(model: Any, steering: MultiLayerSteering) -> Any:
    """``alpha · v_i`` added to decoder layer ``layers[i]``'s output by forward hooks, read from the trained tensor."""
    scaled = steering.alpha * steering.vectors
    return hooks_on(model, [("out", layer, lambda x, v=scaled[i]: x + v) for i, layer in enumerate(steering.layers)])


def peft_factors(modules: dict[tuple[int, str], Any]) -> tuple[list[torch.Tensor], Callable[[], dict[Any, Any]]]:
    """A peft model's LoRA factors (what the reference trains) and a reader of their values by site."""
    params = [p for m in modules.values() for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]

    def read() -> dict[Any, Any]:
        return {site: (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()) for site, m in modules.items()}

    return params, read


class Case:
    """One intervention, its twin on plain transformers, and how to compare them after training.

    ``make()`` builds the emlens intervention (the same start every call); ``twin()`` returns ``(model, edit, base,
    params, read)``: the plain model, the steered and base contexts, the tensors the reference trains and a function
    giving the twin's trained tensors keyed as the emlens intervention's state dict."""

    def __init__(self, make: Callable[[Any], Any], twin: Callable[[Any, Any], tuple[Any, Any, Any, list[torch.Tensor], Any]]):
        self.make, self.twin = make, twin


def lora_case(bridge: Any) -> Case:
    def twin(reference: Any, lora: Any) -> Any:
        model = peft_twin(reference, lora)
        params, read = peft_factors(peft_modules(model))
        return model, nullcontext, model.disable_adapter, params, read

    return Case(lambda b: make_lora(b, "all7-r3"), twin)


def multilayer_case(bridge: Any) -> Case:
    def twin(reference: Any, steering: Any) -> Any:
        return reference, lambda: added_per_layer(reference, steering), nullcontext, [steering.vectors], lambda: steering.state_dict()

    return Case(lambda b: make_steering(b, "resid_post", (0, 2)), twin)


def ablation_and_vector_case(bridge: Any) -> Case:
    d = bridge.cfg.d_model
    u = direction(d)

    def start() -> SteeringVector:
        return SteeringVector(2, d, alpha=2.0, init=0.3 * torch.randn(d, generator=torch.Generator().manual_seed(8)))

    def make(b: Any) -> Any:
        return DirectionAblation.at_layer(u, 1) + start()

    def twin(reference: Any, both: Any) -> Any:
        vector = start()
        edit = lambda: hooks_on(reference, [("out", 1, ablate(u)), ("out", 2, plus(vector))])  # noqa: E731  (built on entry)
        return reference, edit, nullcontext, [vector.vector], lambda: {"vector": vector.vector.detach()}

    return Case(make, twin)


def lora_and_multilayer_case(bridge: Any) -> Case:
    d = bridge.cfg.d_model
    init = 0.4 * torch.randn(2, d, generator=torch.Generator().manual_seed(3))

    def make(b: Any) -> Any:
        return make_lora(b, "qv-r2-plain") + MultiLayerSteering([0, 3], d, alpha=1.0, init=init)

    def twin(reference: Any, both: Any) -> Any:
        lora = make_lora(bridge, "qv-r2-plain")
        steering = MultiLayerSteering([0, 3], d, alpha=1.0, init=init)
        model = peft_twin(reference, lora)
        factors, read_factors = peft_factors(peft_modules(model))
        inner = model.base_model.model

        def read() -> dict[Any, Any]:
            return {**read_factors(), "vectors": steering.vectors.detach()}

        return model, lambda: added_per_layer(inner, steering), model.disable_adapter, [*factors, steering.vectors], read

    return Case(make, twin)


CASES = {
    "lora-r3": lora_case,
    "multilayer": multilayer_case,
    "ablation+vector": ablation_and_vector_case,
    "lora+multilayer": lora_and_multilayer_case,
}


def emlens_state(case: str, got: Any) -> dict[Any, torch.Tensor]:
    """The trained tensors of the emlens intervention, keyed as the twin's ``read()``."""
    if case == "lora-r3":
        return {site: got.factors(*site) for site in got.sites()}
    if case == "multilayer":
        return got.state_dict()
    if case == "ablation+vector":
        return {"vector": got.members()[1].vector.detach()}
    lora, steering = got.members()
    return {**{site: lora.factors(*site) for site in lora.sites()}, "vectors": steering.vectors.detach()}


@pytest.mark.parametrize("cache_prefix", (True, False), ids=("fast", "hooked"))
@pytest.mark.parametrize("case", CASES)
def test_training_runs_equal_plain_transformers(pair: Any, data: TokenDataset, case: str, cache_prefix: bool, monkeypatch: Any) -> None:
    monkeypatch.setattr(torch.optim, "AdamW", functools.partial(torch.optim.AdamW, eps=ADAM_EPS))  # emlens and the reference
    arch, reference, bridge = pair
    spec = CASES[case](bridge)
    config = TrainConfig(**STEPS, cache_prefix=cache_prefix)
    got = spec.make(bridge)
    start = {
        k: (tuple(t.detach().clone() for t in v) if isinstance(v, tuple) else v.detach().clone())
        for k, v in emlens_state(case, got).items()
    }
    result = train(bridge, got, data, config, kl_dataset=data)
    assert ("hooked" in result.plan) != cache_prefix, result.plan
    model, edit, base, params, read = spec.twin(reference, spec.make(bridge))
    reference_train_steps(model, None, data, config, edit=edit, base=base, params=params)
    want, have = read(), emlens_state(case, got)
    assert sorted(map(str, want)) == sorted(map(str, have))
    moved = 0.0
    for key, value in want.items():
        for w, h, s in zip(*(v if isinstance(v, tuple) else (v,) for v in (value, have[key], start[key]))):
            torch.testing.assert_close(h.detach(), w, rtol=1e-4, atol=PARAM_ATOL, msg=f"{arch} {case} {key}")
            moved = max(moved, float((w - s).abs().max()))
    assert moved > 1e-2, f"{arch} {case} did not train"  # two steps, lr 0.05 then 0.025


@pytest.mark.parametrize("settings", (SamplingSettings(12, 0.0), SamplingSettings(12, 1.0)), ids=("greedy", "t1"))
@pytest.mark.parametrize("case", CASES)
def test_decoding_of_a_left_padded_batch_equals_plain_generate(pair: Any, case: str, settings: SamplingSettings, monkeypatch: Any) -> None:
    import emlens.runner.decoding as decoding

    monkeypatch.setattr(decoding, "SLOT_BLOCK", 4)  # several blocks of the slot cache are crossed
    arch, reference, bridge = pair
    spec = CASES[case](bridge)
    pad = bridge.tokenizer.pad_token_id
    ids, mask = left_padded(PADDED_PROMPTS, pad)
    tokens, logits = generate_batch(bridge, ids, mask, spec.make(bridge), settings, seed=11, return_logits=True)
    plan = runner_for(bridge).last_plan
    assert plan is not None and ("slot-cache" in plan.reason) == runner_for(bridge).arch.packable
    model, edit, _, _, _ = spec.twin(copy.deepcopy(reference), spec.make(bridge))
    kwargs: dict[str, Any] = (
        dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if settings.temperature > 0 else dict(do_sample=False)
    )
    torch.manual_seed(11)
    with torch.no_grad(), edit():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens, pad_token_id=pad,
                             eos_token_id=bridge.tokenizer.eos_token_id, output_logits=True, return_dict_in_generate=True, **kwargs)  # fmt: skip
    assert tokens.tolist() == out.sequences[:, ids.shape[1] :].tolist()
    torch.testing.assert_close(logits, torch.stack(out.logits), rtol=1e-4, atol=1e-4)


# --- activations read under an intervention --------------------------------------------------------------------------


@pytest.mark.parametrize("read", (LAYER, LAYER + 1), ids=("at-the-edit", "after-it"))
@pytest.mark.parametrize("kind", (None, *KINDS))
def test_activations_under_an_intervention_equal_plain_transformers(pair: Any, data: TokenDataset, kind: str | None, read: int) -> None:
    """collect_activations at a block's output, with the intervention on, equals a forward hook on plain transformers
    registered after the edit's (so that it reads the edited output), at assistant tokens and at every real token."""
    from emlens.runner.activations import collect_activations

    arch, reference, bridge = pair
    intervention = make_intervention(kind, bridge) if kind else None
    for assistant_only in (True, False):
        got = collect_activations(
            bridge, data, f"blocks.{read}.hook_resid_post", batch_size=2, assistant_only=assistant_only, intervention=intervention
        )
        expected: list[torch.Tensor] = []
        store: dict[str, torch.Tensor] = {}
        with torch.no_grad(), reference_edit(reference, intervention):
            handle = reference.model.layers[read].register_forward_hook(lambda m, a, out, store=store: store.__setitem__("out", out))
            try:
                for batch in data.batches(2):
                    reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                    mask = batch.loss_mask if assistant_only else batch.attention_mask.bool()
                    expected.append(store["out"][mask])
            finally:
                handle.remove()
        want = torch.cat(expected).float()
        # Gemma's residuals reach about 9 here (its embeddings are scaled by √d): rounding is relative to that size
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.abs().max())), msg=f"{arch} {kind} {read}")


# --- the padded fast path on an architecture that is usually packed ------------------------------------------------


@pytest.mark.parametrize("arch", [a for a in PROVED if not a.startswith("gemma")])
def test_the_padded_fast_path_of_a_packable_architecture_equals_plain_transformers(arch: str, monkeypatch: Any) -> None:
    """A Llama-family model whose attention emlens cannot pack (loaded with another attention implementation, e.g.
    flash_attention_2) runs its fast paths padded, as Gemma's always do. Losses, two training steps with KL, an
    efficiency sweep, the KL and left-padded decoding equal plain transformers there."""
    import emlens.runner.core as core
    from tests.test_parity import reference_generate, reference_kl, reference_loss, trains_as_plain_transformers

    packed_calls: list[int] = []
    real_run_packed = core.run_packed
    monkeypatch.setattr(core, "run_packed", lambda *a, **k: packed_calls.append(1) or real_run_packed(*a, **k))
    reference, bridge = tiny_pair(arch)
    runner = runner_for(bridge)
    data = TokenDataset.from_conversations(bridge.tokenizer, CONVERSATIONS, max_length=128)
    evaluate_loss(bridge, data, make_intervention("resid_post", bridge))
    assert packed_calls  # the spy sees the packed path where it runs
    packed_calls.clear()
    runner.arch = dataclasses.replace(runner.arch, packable=False)  # what Architecture.of gives for another attention
    for kind in KINDS:
        intervention = make_intervention(kind, bridge)
        assert evaluate_loss(bridge, data, intervention) == pytest.approx(reference_loss(reference, data, intervention), rel=1e-4, abs=1e-5)
        plan = runner.last_plan
        assert plan is not None and plan.fast, plan
        norms = [0.0, 1.5 * intervention.norm]
        want = [reference_loss(reference, data, None), reference_loss(reference, data, intervention.scaled_to(norms[1]))]
        assert efficiency(bridge, intervention, data, norms, batch_size=2, progress=False) == pytest.approx(want, rel=1e-4, abs=1e-5)
        kl = mean_kl(bridge, intervention, data, batch_size=2)
        assert kl == pytest.approx(reference_kl(reference, data, intervention), rel=1e-3, abs=1e-7)
        config = TrainConfig(lr=0.05, batch_size=1, grad_accum=2, kl_weight=3.0, kl_batch_size=2, warmup_steps=0, progress=False, seed=4)
        trains_as_plain_transformers(reference, bridge, kind, data, config, f"{arch} padded")
        pad = bridge.tokenizer.pad_token_id
        ids, mask = left_padded(PADDED_PROMPTS, pad)
        settings = SamplingSettings(8, 0.0)
        tokens, logits = generate_batch(bridge, ids, mask, intervention, settings, seed=0, return_logits=True)
        assert "slot-cache" not in runner.last_plan.reason  # the slot decoder needs packable blocks
        want_tokens, want_logits = reference_generate(reference, intervention, ids, mask, settings, 0, pad, bridge.tokenizer.eos_token_id)
        assert tokens.tolist() == want_tokens.tolist()
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert not packed_calls  # every fast-path number above came from the padded blocks
