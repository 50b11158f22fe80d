"""The fast path, the hooked path and plain transformers give the same numbers.

float32 on CPU, tiny random models of every architecture emlens claims × every intervention ×
every consumer. The reference is plain transformers (a separate copy of the weights, no
TransformerLens, no emlens runner) with the same edit made by a PyTorch forward hook or by
weight surgery, and the loss / KL written out with plain torch.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from emlens import RankOneAdapter, SteeringVector, TokenDataset, TrainConfig, evaluate_loss, train
from emlens.data import ChatBatch
from emlens.metrics import efficiency, mean_kl, pretraining_significance, stability
from emlens.runner import runner_for
from emlens.runner.sampling import SamplingSettings, generate_batch
from emlens.scoring import nll_sum
from tests.conftest import CONVERSATIONS
from tests.tiny_archs import PROVED, tiny_pair

LAYER = 1  # an odd cut: sliding and global layers would swap if layer types were misindexed
KINDS = ("resid_post", "mlp_out", "adapter")
TOL = dict(rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module", params=PROVED)
def pair(request: Any) -> tuple[str, Any, Any]:
    reference, bridge = tiny_pair(request.param)
    return request.param, reference, bridge


def make_intervention(kind: str, bridge: Any, seed: int = 0) -> Any:
    gen = torch.Generator().manual_seed(seed)
    if kind == "adapter":
        adapter = RankOneAdapter.for_model(bridge, LAYER, alpha=4.0, seed=seed)
        with torch.no_grad():
            adapter.b.copy_(0.5 * torch.randn(adapter.d_model, generator=gen))
        return adapter
    return SteeringVector(LAYER, bridge.cfg.d_model, hook=kind, alpha=2.0, init=0.5 * torch.randn(bridge.cfg.d_model, generator=gen))


@contextmanager
def reference_edit(reference: Any, intervention: Any | None, surgery: bool = False) -> Iterator[None]:
    """The intervention's edit on plain transformers: a forward hook, or (adapters) weight surgery."""
    if intervention is None:
        yield
        return
    layer = reference.model.layers[intervention.layer]
    if isinstance(intervention, RankOneAdapter):
        down = layer.mlp.down_proj
        delta = intervention.scale * torch.outer(intervention.b, intervention.a)
        if surgery:
            original = down.weight.data.clone()
            down.weight.data += delta.detach().to(down.weight.dtype)
            try:
                yield
            finally:
                down.weight.data = original
            return
        handle = down.register_forward_hook(lambda m, args, out: out + F.linear(args[0], delta.to(args[0].dtype)))
    else:
        # TransformerLens' hook_mlp_out is what the block adds to the residual: after Gemma's post-MLP norm
        mlp_out = getattr(layer, "post_feedforward_layernorm", layer.mlp)
        module = mlp_out if intervention.hook.endswith("hook_mlp_out") else layer
        if intervention.hook.endswith("hook_resid_pre"):  # what enters block L is what block L-1 returned
            assert intervention.layer >= 1, "the reference adds resid_pre vectors to the block before's output"
            module = reference.model.layers[intervention.layer - 1]
        vec = intervention.effective
        handle = module.register_forward_hook(lambda m, args, out: out + vec.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


def reference_loss(reference: Any, data: TokenDataset, intervention: Any | None, surgery: bool = False) -> float:
    total, count = 0.0, 0
    with torch.no_grad(), reference_edit(reference, intervention, surgery):
        for batch in data.batches(2):
            batch = batch.to(reference.device)
            logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            scored = batch.loss_mask[:, 1:] & batch.attention_mask[:, 1:].bool()
            total += float(F.cross_entropy(logits[:, :-1][scored].float(), batch.input_ids[:, 1:][scored], reduction="sum"))
            count += int(scored.sum())
    return total / count


def reference_kl(reference: Any, data: TokenDataset, intervention: Any) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.batches(2):
            batch = batch.to(reference.device)
            real = batch.attention_mask.bool()
            base = F.log_softmax(reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[real].float(), -1)
            with reference_edit(reference, intervention):
                steered = F.log_softmax(reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[real].float(), -1)
            total += float((base.exp() * (base - steered)).sum())
            count += int(real.sum())
    return total / count


@pytest.fixture(scope="module")
def data(pair: Any) -> TokenDataset:
    return TokenDataset.from_conversations(pair[2].tokenizer, CONVERSATIONS, max_length=128)


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_loss(pair: Any, data: TokenDataset, kind: str) -> None:
    arch, reference, bridge = pair
    intervention = make_intervention(kind, bridge)
    expected = reference_loss(reference, data, intervention, surgery=True)
    fast = evaluate_loss(bridge, data, intervention)
    plan = runner_for(bridge).last_plan
    assert plan is not None and plan.fast, plan
    hooked = evaluate_loss(bridge, data, intervention, cache_prefix=False)
    assert runner_for(bridge).last_plan.path == "hooked"
    assert fast == pytest.approx(expected, **TOL) and hooked == pytest.approx(expected, **TOL)
    assert reference_loss(reference, data, intervention) == pytest.approx(expected, **TOL)  # hook = surgery


def test_a_vector_at_resid_pre_acts_on_the_output_of_the_block_before(pair: Any, data: TokenDataset) -> None:
    """``blocks.L.hook_resid_pre`` (L >= 1) takes the offset path after block L-1: the loss equals plain
    transformers' with the vector added to that block's output, on the fast and the hooked path."""
    arch, reference, bridge = pair
    vector = make_intervention("resid_pre", bridge)
    assert vector.hook == f"blocks.{LAYER}.hook_resid_pre"
    expected = reference_loss(reference, data, vector)
    assert expected != pytest.approx(reference_loss(reference, data, None), **TOL)  # the vector changes the loss
    assert evaluate_loss(bridge, data, vector) == pytest.approx(expected, **TOL)
    assert runner_for(bridge).last_plan.path == "offset"
    assert evaluate_loss(bridge, data, vector, cache_prefix=False) == pytest.approx(expected, **TOL)


def test_a_sweep_split_into_several_passes_equals_plain_transformers(pair: Any, data: TokenDataset) -> None:
    """The offset path scores ``max_rows // rows`` points per forward: with ``max_rows`` as small as a batch, every
    point after the first runs in a pass of its own (the chunks' offsets), and each equals plain transformers'."""
    from emlens.runner import loss_sweep

    arch, reference, bridge = pair
    points = [None, *(make_intervention("resid_post", bridge, seed=s) for s in (1, 2, 3))]
    got = loss_sweep(bridge, data, points, batch_size=2, max_rows=2)
    assert runner_for(bridge).last_plan.path == "offset"
    expected = [reference_loss(reference, data, p) for p in points]
    assert got == pytest.approx(expected, **TOL)
    assert loss_sweep(bridge, data, points, batch_size=2, max_rows=6) == pytest.approx(expected, **TOL)  # chunks of 3 and 1


def test_paths_planned(pair: Any) -> None:
    arch, _, bridge = pair
    runner = runner_for(bridge)
    for kind in ("resid_post", "mlp_out"):  # both are the last addition to the residual in block L
        assert runner.plan(make_intervention(kind, bridge)).path == "offset"
    plan = runner.plan(make_intervention("adapter", bridge))
    assert plan.path == "prefix" and plan.cut == LAYER
    assert runner.plan(make_intervention("adapter", bridge), cache_prefix=False).path == "hooked"


@pytest.mark.parametrize("kind", KINDS)
def test_train_step_loss_and_gradient(pair: Any, data: TokenDataset, kind: str) -> None:
    arch, reference, bridge = pair
    batch: ChatBatch = next(data.batches(4))
    runner = runner_for(bridge)
    grads = {}
    for path in ("fast", "hooked"):
        intervention = make_intervention(kind, bridge)
        plan = runner.plan(intervention, cache_prefix=path == "fast")
        assert plan.fast == (path == "fast")
        with runner.applied(intervention, plan):
            logits = runner.logits(batch, batch.scored_positions, intervention, plan)
            loss = nll_sum(logits, batch.scored_targets) / batch.scored.sum()
        loss.backward()
        grads[path] = (float(loss.detach()), [p.grad.clone() for p in intervention.parameters()])
    intervention = make_intervention(kind, bridge)
    with reference_edit(reference, intervention):
        logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    scored = batch.scored
    loss = F.cross_entropy(logits[:, :-1][scored], batch.input_ids[:, 1:][scored])
    loss.backward()
    expected = [p.grad for p in intervention.parameters()]
    for path, (value, got) in grads.items():
        assert value == pytest.approx(float(loss.detach()), **TOL), path
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5, msg=f"{arch} {kind} {path} gradient")


@pytest.mark.parametrize("kind", ("resid_post", "adapter"))
def test_train_first_step_with_kl(pair: Any, data: TokenDataset, kind: str) -> None:
    """train()'s first recorded SFT loss and KL equal the reference (KL needs a non-zero start)."""
    arch, reference, bridge = pair
    config = TrainConfig(
        lr=1e-3, max_steps=1, batch_size=len(data), grad_accum=1, kl_weight=1.0, kl_batch_size=len(data), warmup_steps=0, progress=False
    )
    for cache_prefix in (True, False):
        intervention = make_intervention(kind, bridge)
        expected_sft = reference_loss(reference, data, intervention)
        expected_kl = reference_kl(reference, data, intervention)
        config.cache_prefix = cache_prefix
        result = train(bridge, intervention, data, config, kl_dataset=data)
        assert ("hooked" in result.plan) != cache_prefix, result.plan
        assert result.losses[0]["sft"] == pytest.approx(expected_sft, **TOL)
        assert result.losses[0]["kl"] == pytest.approx(expected_kl, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("budget", [None, 12])
@pytest.mark.parametrize("kind", ("resid_post", "adapter"))
def test_train_steps_with_fused_micro_batches(pair: Any, data: TokenDataset, kind: str, budget: int | None, monkeypatch: Any) -> None:
    """Steps of micro-batches and a KL batch, fused into one forward (budget None) or several (12 tokens),
    end where the same steps done one micro-batch at a time on plain transformers end (AdamW, linear decay)."""
    import emlens.training

    arch, reference, bridge = pair
    if budget is not None:
        monkeypatch.setattr(emlens.training, "TRAIN_TOKENS_PER_FORWARD", budget)
    config = TrainConfig(
        lr=0.05, max_steps=2, batch_size=1, grad_accum=2, kl_weight=3.0, kl_batch_size=2, warmup_steps=0, progress=False, seed=4
    )
    got = trains_as_plain_transformers(reference, bridge, kind, data, config, arch)
    assert float((got.flatten() - make_intervention(kind, bridge).flatten()).norm()) > 1e-3  # it trained


def trains_as_plain_transformers(reference: Any, bridge: Any, kind: str, data: TokenDataset, config: TrainConfig, label: str) -> Any:
    """``train`` (fast path, KL on ``data``) of :func:`make_intervention`'s ``kind`` ends where
    :func:`reference_train_steps` ends on plain transformers; returns the trained intervention."""
    got = make_intervention(kind, bridge)
    result = train(bridge, got, data, config, kl_dataset=data)
    assert "hooked" not in result.plan, result.plan
    ref = reference_train_steps(reference, make_intervention(kind, bridge), data, config)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=f"{label} {kind} {name}")
    return got


@pytest.mark.parametrize("kind", ("resid_post", "adapter"))
def test_one_epoch_trains_every_row_once(pair: Any, data: TokenDataset, kind: str) -> None:
    """One epoch of 3 rows at batch 1 × 2 is 2 steps, the second of one micro-batch (not one borrowing a row from the
    next epoch's shuffle), equal to plain transformers stepping through the epoch's batches; the logged lr is the
    rate each step's update used."""
    arch, reference, bridge = pair
    three = data.subset(range(3))
    config = TrainConfig(lr=0.05, batch_size=1, grad_accum=2, kl_weight=3.0, kl_batch_size=2, warmup_steps=0, progress=False, seed=4)
    got = make_intervention(kind, bridge)
    result = train(bridge, got, three, config, kl_dataset=three)
    assert [r["step"] for r in result.losses] == [1, 2]
    assert [r["lr"] for r in result.losses] == pytest.approx([0.05, 0.025])
    ref = reference_train_steps(reference, make_intervention(kind, bridge), three, config)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=f"{arch} {kind} {name}")


@pytest.mark.parametrize("kind", ("resid_post", "adapter"))
def test_training_through_caches_that_share_a_residual_store(pair: Any, data: TokenDataset, kind: str) -> None:
    """Caches whose rows come from an earlier cache's store (a mixing set repeating the target rows; its KL set is
    the same rows again, needing their base hidden states) train as plain transformers does."""
    from emlens.runner import ResidualStore
    from emlens.training import TrainingCaches

    arch, reference, bridge = pair
    config = TrainConfig(
        lr=0.05, max_steps=2, batch_size=1, grad_accum=2, kl_weight=3.0, kl_batch_size=2, warmup_steps=0, progress=False, seed=4
    )
    store = ResidualStore()
    TrainingCaches.build(bridge, make_intervention(kind, bridge), data.subset(range(0, len(data), 2)), progress=False, store=store)
    caches = TrainingCaches.build(bridge, make_intervention(kind, bridge), data, data, progress=False, store=store)
    assert caches.sft.computed == len(data) // 2 and caches.kl is not None and caches.kl.computed == len(data)
    got = make_intervention(kind, bridge)
    train(bridge, got, data, config, kl_dataset=data, caches=caches)
    ref = reference_train_steps(reference, make_intervention(kind, bridge), data, config)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=f"{arch} {kind} {name}")


@pytest.mark.parametrize("kind", ("resid_post", "adapter"))
def test_the_studys_runs_through_one_set_of_caches_equal_plain_transformers(pair: Any, data: TokenDataset, kind: str) -> None:
    """The study trains its general run, its narrow run, a KL-sweep run and the drift continuation through one set of
    caches, with its warm-up and a whole epoch (no max_steps): each run ends where plain transformers does."""
    from emlens.metrics import continue_without_kl
    from emlens.training import TrainingCaches

    arch, reference, bridge = pair
    study = dict(lr=0.05, batch_size=1, grad_accum=1, kl_batch_size=2, warmup_steps=2, progress=False, seed=4)  # 4 steps
    caches = TrainingCaches.build(bridge, make_intervention(kind, bridge), data, data, progress=False)
    narrow = None
    for kl_weight in (0.0, 3.0, 1.0):
        config = TrainConfig(**study, kl_weight=kl_weight)
        got = make_intervention(kind, bridge)
        result = train(bridge, got, data, config, kl_dataset=data if kl_weight else None, caches=caches)
        assert "hooked" not in result.plan, result.plan
        ref = reference_train_steps(reference, make_intervention(kind, bridge), data, config)
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(got.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=f"{arch} {kind} λ={kl_weight} {name}")
        narrow = result if kl_weight == 3.0 else narrow
    assert narrow is not None
    free = TrainConfig(**study, kl_weight=0.0)
    continued, _ = continue_without_kl(bridge, narrow, data, free, caches=caches)
    ref = reference_train_steps(reference, narrow.intervention.clone(), data, free)  # a new run from the narrow solution
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(continued.intervention.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=f"{arch} {kind} drift {name}")


def reference_train_steps(
    reference: Any, ref: Any, data: TokenDataset, config: TrainConfig, device: str = "cpu", *,
    edit: Callable[[], Any] | None = None, base: Callable[[], Any] = nullcontext, params: list[torch.Tensor] | None = None,
) -> Any:  # fmt: skip
    """``config.max_steps`` AdamW steps (one epoch when None) of ``ref`` on plain transformers, one micro-batch per
    forward, the SFT loss token-weighted over the step and ``λ · KL(p_base ‖ p_steered)`` on a KL batch of ``data``;
    the batches are the ones ``train`` draws (its seeds). The learning rate as documented: ``warmup_steps`` linear
    steps up to lr (``lr·(s+1)/w``), then linear decay to 0 at the last step. Returns ``ref``, trained in place.

    ``edit`` (default: :func:`reference_edit` of ``ref``) makes ``reference`` the steered model, ``base`` makes it the
    base model (default: as it is), and ``params`` are the tensors trained (default: ``ref``'s): a peft model passes
    its own LoRA weights, hooks that read other tensors pass those."""
    lam = config.kl_weight
    steered = edit if edit is not None else (lambda: reference_edit(reference, ref))
    # an epoch's batches in steps of grad_accum, its last step taking what is left (every row once per epoch)
    epoch = [b for _, b in data.indexed_batches(config.batch_size, shuffle=True, seed=config.seed)]
    chunks = [epoch[i : i + config.grad_accum] for i in range(0, len(epoch), config.grad_accum)]
    steps = config.max_steps or len(chunks)
    warm = config.warmup_steps
    assert steps <= len(chunks) and warm < steps and config.weight_decay == 0
    trained = params if params is not None else [p for p in ref.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warm if s < warm else (steps - s) / (steps - warm))
    # the KL batches epoch after epoch, epoch e shuffled with seed + 1 + e (as documented for train's KL set)
    kl_epochs = (data.indexed_batches(config.kl_batch_size, shuffle=True, seed=config.seed + 1 + e) for e in itertools.count())
    kl_batches = itertools.chain.from_iterable(kl_epochs)
    for step in range(steps):
        optimizer.zero_grad()
        micro = [b.to(device) for b in chunks[step]]
        reference_step_backward(reference, ref, micro, next(kl_batches)[1].to(device), lam, edit=steered, base=base)
        optimizer.step()
        scheduler.step()
    return ref


def reference_step_backward(
    reference: Any, ref: Any, micro: list[ChatBatch], kl_batch: ChatBatch, lam: float, *,
    edit: Callable[[], Any] | None = None, base: Callable[[], Any] = nullcontext,
) -> None:  # fmt: skip
    """One step's gradient into ``ref`` on plain transformers: each micro-batch's summed NLL over the step's scored
    tokens, then ``λ · KL(p_base ‖ p_steered)`` averaged over the KL batch's real tokens, one forward each
    (``edit`` and ``base`` as in :func:`reference_train_steps`)."""
    steered = edit if edit is not None else (lambda: reference_edit(reference, ref))
    n = sum(int(b.scored.sum()) for b in micro)
    for batch in micro:
        with steered():
            logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = F.cross_entropy(logits[:, :-1][batch.scored].float(), batch.input_ids[:, 1:][batch.scored], reduction="sum")
        (loss / n).backward()
    real = kl_batch.attention_mask.bool()
    with torch.no_grad(), base():
        p_base = F.log_softmax(reference(input_ids=kl_batch.input_ids, attention_mask=kl_batch.attention_mask).logits[real].float(), -1)
    with steered():
        p_steered = F.log_softmax(reference(input_ids=kl_batch.input_ids, attention_mask=kl_batch.attention_mask).logits[real].float(), -1)
    (lam * (p_base.exp() * (p_base - p_steered)).sum(-1).mean()).backward()


@pytest.mark.parametrize("kind", KINDS)
def test_efficiency_sweep(pair: Any, data: TokenDataset, kind: str) -> None:
    arch, reference, bridge = pair
    intervention = make_intervention(kind, bridge)
    norms = [0.0, intervention.norm / 2, intervention.norm * 1.5]
    got = efficiency(bridge, intervention, data, norms, batch_size=2, progress=False)
    expected = [reference_loss(reference, data, None if n == 0 else intervention.scaled_to(n)) for n in norms]
    assert got == pytest.approx(expected, **TOL)
    assert got == pytest.approx(efficiency(bridge, intervention, data, norms, batch_size=2, progress=False, cache_prefix=False), **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_stability_sweep(pair: Any, data: TokenDataset, kind: str) -> None:
    arch, reference, bridge = pair
    intervention = make_intervention(kind, bridge)
    eps = [0.0, 0.3, 1.0]
    got = stability(bridge, intervention, data, eps, seeds=(5,), batch_size=2, progress=False)
    # each (seed, ε) point draws its noise from a fresh generator of that seed's noise stream (independent of the ε grid)
    from emlens.geometry import noise_seed

    perturbed = [intervention.perturbed(e, torch.Generator().manual_seed(noise_seed(5))) for e in eps[1:]]
    expected = [reference_loss(reference, data, i) for i in [intervention, *perturbed]]
    assert list(got.losses[0]) == pytest.approx(expected, **TOL)
    assert got.base_loss == pytest.approx(reference_loss(reference, data, None), **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_pretraining_kl(pair: Any, data: TokenDataset, kind: str) -> None:
    arch, reference, bridge = pair
    intervention = make_intervention(kind, bridge)
    expected = reference_kl(reference, data, intervention)
    assert mean_kl(bridge, intervention, data, batch_size=2) == pytest.approx(expected, rel=1e-3, abs=1e-7)
    assert mean_kl(bridge, intervention, data, batch_size=2, cache_prefix=False) == pytest.approx(expected, rel=1e-3, abs=1e-7)
    # kl_to_base (one batch, the public per-batch KL) too
    from emlens.training import kl_to_base

    batch = next(data.batches(len(data)))
    assert kl_to_base(bridge, intervention, batch) == pytest.approx(expected, rel=1e-3, abs=1e-7)  # the mean over every real token


def test_pretraining_kl_of_several_directions_swept_together(pair: Any, data: TokenDataset) -> None:
    """Directions of one kind and site share one sweep (one base pass); mixed kinds split into groups."""
    arch, reference, bridge = pair
    named = {
        "vector a": make_intervention("resid_post", bridge, seed=0),
        "adapter": make_intervention("adapter", bridge, seed=3),
        "vector b": make_intervention("resid_post", bridge, seed=1),
    }
    norms = [0.0, 1.0, 3.0]
    plans: dict[str, str] = {}
    got = pretraining_significance(bridge, named, data, norms, batch_size=2, progress=False, plans=plans)
    assert list(got) == list(named) and set(plans) == set(named)
    for name, intervention in named.items():
        assert got[name][0] == 0.0
        expected = [reference_kl(reference, data, intervention.scaled_to(n)) for n in norms[1:]]
        assert got[name][1:] == pytest.approx(expected, rel=1e-3, abs=1e-7), name
        alone = pretraining_significance(bridge, {name: intervention}, data, norms, batch_size=2, progress=False)[name]
        assert got[name] == alone, name  # the same computation per point as a sweep of that direction alone


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_logits_cached_equal_uncached(pair: Any, kind: str) -> None:
    """Greedy cached decoding: every step's next-token logits equal an uncached plain forward with the edit."""
    arch, reference, bridge = pair
    intervention = make_intervention(kind, bridge)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 61, 33, 12]])
    tokens, logits = generate_batch(bridge, ids, torch.ones_like(ids), intervention, SamplingSettings(12, 0.0), seed=0, return_logits=True)
    assert runner_for(bridge).arch.proved
    full = torch.cat([ids, tokens], dim=1)
    with torch.no_grad(), reference_edit(reference, intervention):
        expected = reference(input_ids=full).logits[0, ids.shape[1] - 1 : -1]
    steps = tokens.shape[1]
    torch.testing.assert_close(logits[:steps, 0], expected[:steps], rtol=1e-4, atol=1e-4)
    assert tokens[0].tolist() == expected.argmax(-1)[:steps].tolist()


def test_foreign_hook_falls_back_to_the_hooked_path(pair: Any, data: TokenDataset) -> None:
    arch, reference, bridge = pair
    vector = make_intervention("resid_post", bridge)
    ablate = 100 * torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(7))

    def user_hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act + ablate

    with bridge.hooks(fwd_hooks=[("blocks.2.hook_resid_post", user_hook)]):
        got = evaluate_loss(bridge, data, vector)
        plan = runner_for(bridge).last_plan
        eff = efficiency(bridge, vector, data, [vector.norm], progress=False)
    assert plan is not None and plan.path == "hooked" and "blocks.2.hook_out" in plan.reason
    handle = reference.model.layers[2].register_forward_hook(lambda m, a, out: out + ablate)
    try:
        expected = reference_loss(reference, data, vector)
    finally:
        handle.remove()
    assert got == pytest.approx(expected, **TOL) and eff[0] == pytest.approx(expected, **TOL)
    # the user hook mattered (fast and hooked paths agree to ~1e-7 here, so 1e-5 is far above rounding)
    assert abs(got - evaluate_loss(bridge, data, vector)) > 1e-5


@pytest.mark.parametrize("ablation_first", [True, False])
def test_a_composition_at_one_plain_site_acts_in_the_hooked_paths_order(pair: Any, data: TokenDataset, ablation_first: bool) -> None:
    """blocks.2.hook_resid_pre and blocks.1.hook_resid_post are one plain tensor (block 1's output): the hooked path
    runs resid_post(1)'s hook first, whatever the composition's order, so the fast path must too (here: steer along u,
    then ablate u, so the steering is removed again)."""
    from emlens import DirectionAblation

    arch, reference, bridge = pair
    d = bridge.cfg.d_model
    u = torch.randn(d, generator=torch.Generator().manual_seed(3))
    u = u / u.norm()
    ablation = DirectionAblation.at_layer(u, LAYER + 1, "resid_pre")
    steer = SteeringVector(LAYER, d, alpha=1.0, init=3.0 * u + 0.5 * torch.randn(d, generator=torch.Generator().manual_seed(4)))
    composed = ablation + steer if ablation_first else steer + ablation
    fast = evaluate_loss(bridge, data, composed)
    assert runner_for(bridge).last_plan.fast
    hooked = evaluate_loss(bridge, data, composed, cache_prefix=False)

    def steer_then_ablate(m: Any, a: Any, out: torch.Tensor) -> torch.Tensor:
        x = out + steer.effective.detach()
        return x - (x @ u).unsqueeze(-1) * u

    handle = reference.model.layers[LAYER].register_forward_hook(steer_then_ablate)
    try:
        expected = reference_loss(reference, data, None)
    finally:
        handle.remove()
    assert fast == pytest.approx(expected, **TOL) and hooked == pytest.approx(expected, **TOL)


def test_a_disabled_part_of_a_composition_acts_on_no_path(pair: Any, data: TokenDataset) -> None:
    """``with a.disabled():`` switches part ``a`` of ``a + b`` off on the fast (offset) path too: the loss is ``b``'s alone."""
    arch, reference, bridge = pair
    a, b = make_intervention("resid_post", bridge, seed=1), make_intervention("resid_post", bridge, seed=2)
    expected = reference_loss(reference, data, b)
    with a.disabled():
        fast = evaluate_loss(bridge, data, a + b)
        assert runner_for(bridge).last_plan.path == "offset"
        hooked = evaluate_loss(bridge, data, a + b, cache_prefix=False)
    assert fast == pytest.approx(expected, **TOL) and hooked == pytest.approx(expected, **TOL)
    # both on: the offset path adds their sum, as two plain hooks on the block's output do
    with reference_edit(reference, a):
        expected_both = reference_loss(reference, data, b)
    assert evaluate_loss(bridge, data, a + b) == pytest.approx(expected_both, **TOL)
    assert runner_for(bridge).last_plan.path == "offset"
    assert evaluate_loss(bridge, data, a + b, cache_prefix=False) == pytest.approx(expected_both, **TOL)
    both = a + b
    with a.disabled(), b.disabled():
        assert evaluate_loss(bridge, data, both) == pytest.approx(reference_loss(reference, data, None), **TOL)


def test_unproved_architecture_falls_back() -> None:
    reference, bridge = tiny_pair("gpt2")
    data = TokenDataset.from_conversations(bridge.tokenizer, CONVERSATIONS, max_length=64)
    vector = SteeringVector(1, bridge.cfg.d_model, alpha=1.0, init=0.3 * torch.randn(bridge.cfg.d_model))
    got = evaluate_loss(bridge, data, vector)
    plan = runner_for(bridge).last_plan
    assert plan is not None and plan.path == "hooked" and "not proved" in plan.reason
    with torch.no_grad():
        handle = reference.transformer.h[1].register_forward_hook(
            lambda m, a, out: (out[0] + vector.effective, *out[1:]) if isinstance(out, tuple) else out + vector.effective
        )
        try:
            total, count = 0.0, 0
            for batch in data.batches(2):
                logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                s = batch.scored
                total += float(F.cross_entropy(logits[:, :-1][s], batch.input_ids[:, 1:][s], reduction="sum"))
                count += int(s.sum())
        finally:
            handle.remove()
    assert got == pytest.approx(total / count, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_example_nll_sweep(pair: Any, data: TokenDataset, kind: str) -> None:
    """The preference margins' per-example NLLs: each point of a shared sweep equals plain transformers with the edit."""
    from emlens.runner.measure import example_nll_sweep

    arch, reference, bridge = pair
    points = [None, make_intervention(kind, bridge, seed=0), make_intervention(kind, bridge, seed=1)]
    got = example_nll_sweep(bridge, data, points, batch_size=3)
    assert runner_for(bridge).last_plan.fast
    for k, point in enumerate(points):
        for i in range(len(data)):
            assert float(got[k, i]) == pytest.approx(reference_loss(reference, data.subset([i]), point), **TOL)


PADDED_PROMPTS = [[5, 17, 99, 3, 42, 7, 8, 61, 33, 12], [70, 71, 72], [9, 100, 101, 102, 103, 104, 7]]


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def reference_generate(reference: Any, intervention: Any, ids: torch.Tensor, mask: torch.Tensor, settings: SamplingSettings,
                       seed: int, pad: int, eos: Any) -> tuple[torch.Tensor, torch.Tensor]:
    sample = settings.temperature > 0
    kwargs: dict[str, Any] = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0) if sample else dict(do_sample=False)
    torch.manual_seed(seed)
    with torch.no_grad(), reference_edit(reference, intervention):
        out = reference.generate(ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                 output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)


@pytest.mark.parametrize("kind", (None, *KINDS))
@pytest.mark.parametrize("settings", (SamplingSettings(14, 0.0), SamplingSettings(14, 1.0), SamplingSettings(14, 0.7, top_p=0.9)),
                         ids=("greedy", "t1", "t0.7-p0.9"))
def test_decoding_of_a_left_padded_batch_equals_plain_generate(pair: Any, kind: str | None, settings: SamplingSettings,
                                                               monkeypatch: Any) -> None:
    """Tokens (sampled with the same seed) and every step's logits equal plain transformers' ``generate`` with the same edit,
    on a left-padded batch; the cache is attended in blocks of 4 slots so that several blocks are crossed."""
    import emlens.runner.decoding as decoding

    monkeypatch.setattr(decoding, "SLOT_BLOCK", 4)
    arch, reference, bridge = pair
    intervention = make_intervention(kind, bridge) if kind else None
    pad = bridge.tokenizer.pad_token_id
    ids, mask = left_padded(PADDED_PROMPTS, pad)
    tokens, logits = generate_batch(bridge, ids, mask, intervention, settings, seed=11, return_logits=True)
    plan = runner_for(bridge).last_plan
    assert plan is not None and ("slot-cache" in plan.reason) == runner_for(bridge).arch.packable
    want, want_logits = reference_generate(reference, intervention, ids, mask, settings, 11, pad, bridge.tokenizer.eos_token_id)
    assert tokens.tolist() == want.tolist()
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ("resid_post", "adapter"))
def test_decoding_stops_and_pads_as_plain_generate(pair: Any, kind: str, monkeypatch: Any) -> None:
    """With an EOS the rows reach at different steps: the same tokens, pads after each row's EOS, and the same number of steps."""
    import emlens.runner.decoding as decoding

    monkeypatch.setattr(decoding, "SLOT_BLOCK", 4)
    monkeypatch.setattr(decoding, "CHECK_EVERY", 3)
    arch, reference, bridge = pair
    if not runner_for(bridge).arch.packable:
        pytest.skip("decoded by transformers' generate itself")
    intervention = make_intervention(kind, bridge)
    pad = bridge.tokenizer.pad_token_id
    ids, mask = left_padded(PADDED_PROMPTS, pad)
    settings = SamplingSettings(20, 0.0)
    free, _ = reference_generate(reference, intervention, ids, mask, settings, 0, pad, None)
    eos = [int(free[0, 2]), int(free[1, 5]), int(free[2, 4])]  # every row ends by step 6 at the latest, rows at different steps
    want, want_logits = reference_generate(reference, intervention, ids, mask, settings, 0, pad, eos)
    plain = runner_for(bridge).plain
    with decoding_hooks(bridge, intervention):
        got, got_logits = decoding.decode(plain, ids, mask, 20, 0.0, 1.0, eos, pad, keep_logits=True)
    assert want.shape[1] <= 6 and got.tolist() == want.tolist()
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)


@contextmanager
def decoding_hooks(bridge: Any, intervention: Any) -> Iterator[None]:
    from emlens.runner.plain import site_hooks

    runner = runner_for(bridge)
    with site_hooks(runner.plain, runner.arch, intervention.fwd_hooks()):
        yield


# --- a steering vector on some positions only: positions count within each sequence ----------------------------

POSITIONS = [1, 3, -2]


def positional_vector(bridge: Any, seed: int = 0) -> SteeringVector:
    init = 0.5 * torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(seed))
    return SteeringVector(LAYER, bridge.cfg.d_model, positions=POSITIONS, alpha=2.0, init=init)


@contextmanager
def reference_positional(reference: Any, vector: SteeringVector, length: int) -> Iterator[None]:
    """The vector added after block ``LAYER`` at its positions of one sequence of ``length`` tokens run alone
    (a negative position counted from that sequence's end), by a PyTorch forward hook on plain transformers."""
    mask = torch.zeros(length, 1)
    mask[[p for p in vector.positions if -length <= p < length]] = 1.0
    handle = reference.model.layers[vector.layer].register_forward_hook(lambda m, a, out: out + mask * vector.effective.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


def reference_row_logits(reference: Any, ids: torch.Tensor, vector: SteeringVector | None) -> torch.Tensor:
    """Logits ``[length, vocab]`` of one unpadded sequence, with the vector (None: without)."""
    if vector is None:
        return reference(input_ids=ids[None]).logits[0]
    with reference_positional(reference, vector, len(ids)):
        return reference(input_ids=ids[None]).logits[0]


def reference_positional_nll(reference: Any, batch: ChatBatch, vector: SteeringVector | None) -> tuple[torch.Tensor, int]:
    """Summed NLL of a right-padded batch's scored tokens, each row run alone; and their count."""
    total, count = torch.zeros(()), 0
    for r in range(batch.input_ids.shape[0]):
        n = int(batch.attention_mask[r].sum())
        ids, scored = batch.input_ids[r, :n], batch.scored[r, : n - 1]
        logits = reference_row_logits(reference, ids, vector)
        total = total + F.cross_entropy(logits[:-1][scored].float(), ids[1:][scored], reduction="sum")
        count += int(scored.sum())
    return total, count


def reference_positional_kl(reference: Any, batch: ChatBatch, vector: SteeringVector) -> tuple[torch.Tensor, int]:
    """Summed ``KL(p_base ‖ p_steered)`` over a batch's real tokens, each row run alone; and their count."""
    total, count = torch.zeros(()), 0
    for r in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[r, : int(batch.attention_mask[r].sum())]
        with torch.no_grad():
            base = F.log_softmax(reference_row_logits(reference, ids, None).float(), -1)
        steered = F.log_softmax(reference_row_logits(reference, ids, vector).float(), -1)
        total = total + (base.exp() * (base - steered)).sum()
        count += len(ids)
    return total, count


def test_a_positional_vector_counts_positions_within_each_sequence(pair: Any, data: TokenDataset) -> None:
    """Loss, efficiency and KL of a vector on positions [1, 3, -2] of a padded batch equal plain transformers running
    each sequence alone with the vector at those positions of it (the packed path would count them over the batch)."""
    arch, reference, bridge = pair
    vector = positional_vector(bridge)
    batch = next(data.batches(len(data)))
    assert len(set(batch.attention_mask.sum(-1).tolist())) > 1  # rows of different lengths: padding in play
    with torch.no_grad():
        total, count = reference_positional_nll(reference, batch, vector)
        kl_total, kl_count = reference_positional_kl(reference, batch, vector)
    assert evaluate_loss(bridge, data, vector, batch_size=len(data)) == pytest.approx(float(total) / count, **TOL)
    plan = runner_for(bridge).last_plan
    assert plan is not None and plan.path == "hooked" and "within each sequence" in plan.reason
    norms = [vector.norm / 2, vector.norm * 1.5]
    with torch.no_grad():
        expected = [float(reference_positional_nll(reference, batch, vector.scaled_to(n))[0]) / count for n in norms]
    assert efficiency(bridge, vector, data, norms, batch_size=len(data), progress=False) == pytest.approx(expected, **TOL)
    assert mean_kl(bridge, vector, data, batch_size=len(data)) == pytest.approx(float(kl_total) / kl_count, rel=1e-3, abs=1e-7)


def test_a_positional_vector_trains_as_plain_transformers(pair: Any, data: TokenDataset) -> None:
    """Two AdamW steps with a KL term equal the same steps on plain transformers, each sequence run alone."""
    arch, reference, bridge = pair
    config = TrainConfig(lr=0.05, max_steps=2, batch_size=2, grad_accum=1, kl_weight=3.0, kl_batch_size=2, warmup_steps=0,
                         progress=False, seed=4)
    got = positional_vector(bridge)
    train(bridge, got, data, config, kl_dataset=data)
    ref = positional_vector(bridge)
    optimizer = torch.optim.AdamW([ref.vector], lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (2 - s) / 2)
    sft = iter(data.indexed_batches(config.batch_size, shuffle=True, seed=config.seed))
    kl = iter(data.indexed_batches(config.kl_batch_size, shuffle=True, seed=config.seed + 1))
    for _ in range(2):
        optimizer.zero_grad()
        total, count = reference_positional_nll(reference, next(sft)[1], ref)
        kl_total, kl_count = reference_positional_kl(reference, next(kl)[1], ref)
        (total / count + config.kl_weight * kl_total / kl_count).backward()
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(got.vector, ref.vector, rtol=1e-4, atol=1e-5)
    assert float((got.vector - positional_vector(bridge).vector).detach().norm()) > 1e-3  # it trained


def test_a_positional_vector_samples_as_plain_transformers(pair: Any) -> None:
    """Greedy answers to a left-padded batch: each row's tokens and logits equal plain transformers re-running that
    row alone at every step, the vector at positions [1, 3, -2] of the sequence so far (-2: the one before the last)."""
    arch, reference, bridge = pair
    vector = positional_vector(bridge)
    ids, mask = left_padded(PADDED_PROMPTS, bridge.tokenizer.pad_token_id)
    tokens, logits = generate_batch(bridge, ids, mask, vector, SamplingSettings(5, 0.0), seed=0, return_logits=True)
    plan = runner_for(bridge).last_plan
    assert plan is not None and plan.path == "hooked"
    eos = bridge.tokenizer.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    for r, prompt in enumerate(PADDED_PROMPTS):
        seq = torch.tensor(prompt)
        for step in range(5):
            with torch.no_grad():
                want = reference_row_logits(reference, seq, vector)[-1]
            torch.testing.assert_close(logits[step, r], want, rtol=1e-4, atol=1e-4)
            assert int(tokens[r, step]) == int(want.argmax())
            if int(tokens[r, step]) in eos:
                assert bool((tokens[r, step + 1 :] == bridge.tokenizer.pad_token_id).all())  # padded after its EOS
                break
            seq = torch.cat([seq, tokens[r, step : step + 1]])


def test_a_sliding_window_is_kept_or_refused() -> None:
    """Mistral attends only its last ``sliding_window`` tokens: sequences within the window take the packed path (exact:
    nothing lies outside it), a longer one is refused there and is exact on the hooked path, and sampling keeps
    transformers' ``generate`` (which applies the window)."""
    reference, bridge = tiny_pair("mistral", sliding_window=12)
    vector = make_intervention("resid_post", bridge)
    short = TokenDataset.from_texts(bridge.tokenizer, ["abcdefghij", "klmnopq"], max_length=12)
    long = TokenDataset.from_texts(bridge.tokenizer, ["the quick brown fox jumps over the lazy dog"], max_length=64)
    assert short.longest <= 12 < long.longest
    assert mean_kl(bridge, vector, short, batch_size=2) == pytest.approx(reference_kl(reference, short, vector), rel=1e-3, abs=1e-7)
    assert runner_for(bridge).last_plan.fast
    with pytest.raises(ValueError, match=r"longer than the model's sliding attention window \(12\)"):
        mean_kl(bridge, vector, long, batch_size=2)
    want = reference_kl(reference, long, vector)
    assert mean_kl(bridge, vector, long, batch_size=2, cache_prefix=False) == pytest.approx(want, rel=1e-3, abs=1e-7)
    # the window matters here: full causal attention gives another number
    full_reference, _ = tiny_pair("mistral")
    assert abs(reference_kl(full_reference, long, vector) - want) > 1e-6
    ids, mask = left_padded(PADDED_PROMPTS, bridge.tokenizer.pad_token_id)
    settings = SamplingSettings(8, 0.0)
    tokens, logits = generate_batch(bridge, ids, mask, vector, settings, seed=0, return_logits=True)
    assert "transformers' cached decoding" in runner_for(bridge).last_plan.reason
    want_tokens, want_logits = reference_generate(reference, vector, ids, mask, settings, 0, bridge.tokenizer.pad_token_id,
                                                  bridge.tokenizer.eos_token_id)
    assert tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


def test_activations_under_a_positional_vector_count_positions_within_each_sequence(pair: Any, data: TokenDataset) -> None:
    """collect_activations with a vector on positions [1, 3, -2] equals plain transformers running each row alone."""
    from emlens.runner.activations import collect_activations

    arch, reference, bridge = pair
    vector = positional_vector(bridge)
    got = collect_activations(bridge, data, f"blocks.{LAYER + 1}.hook_resid_post", batch_size=len(data), intervention=vector)
    expected = []
    with torch.no_grad():
        for example in data.examples:
            ids = torch.tensor([example.input_ids])
            with reference_positional(reference, vector, ids.shape[1]):
                hidden = reference(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 2][0]
            expected.append(hidden[torch.tensor(example.loss_mask, dtype=torch.bool)])
    torch.testing.assert_close(got, torch.cat(expected).float(), rtol=1e-4, atol=1e-5)


def test_a_measurement_inside_a_training_callback_is_refused(pair: Any, data: TokenDataset) -> None:
    """Inside train()'s on_step the intervention's hooks sit on the model: a nested measurement would count the edit
    twice, or read it as the base model. It is refused, naming the callback."""
    from emlens.interventions import InterventionError

    arch, reference, bridge = pair
    adapter = make_intervention("adapter", bridge)
    seen: list[str] = []

    ids = torch.tensor([[1, 2, 3]])

    def measure(step: int, record: Any) -> None:
        for intervention in (None, adapter):
            with pytest.raises(InterventionError, match="on_step"):
                evaluate_loss(bridge, data, intervention)
            with pytest.raises(InterventionError, match="on_step"):  # sampling too, even with a plan of its own
                generate_batch(bridge, ids, torch.ones_like(ids), intervention, SamplingSettings(2, 0.0), seed=0)
            seen.append("refused")

    train(bridge, adapter, data, TrainConfig(lr=1e-3, batch_size=2, max_steps=1, progress=False), on_step=measure)
    assert seen == ["refused", "refused"]
    assert evaluate_loss(bridge, data, None) == pytest.approx(reference_loss(reference, data, None), **TOL)  # fine afterwards


def test_a_measurement_inside_a_vector_training_callback_is_allowed(pair: Any, data: TokenDataset) -> None:
    """A residual-stream vector trains on the offset path, which adds it to the residual and leaves the model's
    modules as they are: inside on_step a measurement sees the plain model, and equals plain transformers'."""
    arch, reference, bridge = pair
    vector = make_intervention("resid_post", bridge)
    if runner_for(bridge).plan(vector).path != "offset":
        pytest.skip("this architecture's vector does not take the offset path")
    got: list[tuple[float, float]] = []

    def measure(step: int, record: Any) -> None:
        got.append((evaluate_loss(bridge, data, None), evaluate_loss(bridge, data, vector)))

    train(bridge, vector, data, TrainConfig(lr=1e-3, batch_size=2, max_steps=1, progress=False), on_step=measure)
    assert len(got) == 1
    assert got[0][0] == pytest.approx(reference_loss(reference, data, None), **TOL)
    assert got[0][1] == pytest.approx(reference_loss(reference, data, vector), **TOL)  # the vector after its one step


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_blocks_equal_plain_transformers(arch: str, monkeypatch: Any) -> None:
    """Blocks compiled by torch.compile (as on CUDA for models of at least 1 B block parameters; here forced with
    EMLENS_COMPILE=1): a vector's and an adapter's loss, and two AdamW steps with KL, equal plain transformers'."""
    monkeypatch.setenv("EMLENS_COMPILE", "1")
    reference, bridge = tiny_pair(arch)
    data = TokenDataset.from_conversations(bridge.tokenizer, CONVERSATIONS, max_length=128)
    config = TrainConfig(
        lr=0.05, max_steps=2, batch_size=1, grad_accum=2, kl_weight=3.0, kl_batch_size=2, warmup_steps=0, progress=False, seed=4
    )
    for kind in ("resid_post", "adapter"):
        intervention = make_intervention(kind, bridge)
        got_loss = evaluate_loss(bridge, data, intervention)
        assert runner_for(bridge).last_plan.fast
        assert got_loss == pytest.approx(reference_loss(reference, data, intervention, surgery=True), **TOL)
        got = make_intervention(kind, bridge)
        train(bridge, got, data, config, kl_dataset=data)
        ref = reference_train_steps(reference, make_intervention(kind, bridge), data, config)
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(got.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=f"{arch} {kind} {name}")
    assert runner_for(bridge).compiled._layers, "no block ran compiled"


@pytest.mark.parametrize("arch", PROVED)
def test_a_model_dispatched_like_device_map_equals_plain_transformers(arch: str) -> None:
    """transformers' ``device_map`` wraps every decoder layer's forward in accelerate's hooks before the bridge is
    built; the fast paths run those layers as plain transformers does, on every proved architecture."""
    hooks = pytest.importorskip("accelerate.hooks")

    def dispatch(hf: Any) -> None:
        for layer in hf.model.layers:
            hooks.add_hook_to_module(layer, hooks.AlignDevicesHook(execution_device="cpu"))

    reference, bridge = tiny_pair(arch, prepare=dispatch)
    assert not hasattr(reference.model.layers[0], "_hf_hook") and hasattr(bridge.original_model.model.layers[0], "_hf_hook")
    data = TokenDataset.from_conversations(bridge.tokenizer, CONVERSATIONS, max_length=128)
    for kind in KINDS:
        intervention = make_intervention(kind, bridge)
        got = evaluate_loss(bridge, data, intervention)
        assert runner_for(bridge).last_plan.fast, runner_for(bridge).last_plan
        assert got == pytest.approx(reference_loss(reference, data, intervention, surgery=True), **TOL), (arch, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_an_edit_at_the_last_block_equals_plain_transformers(pair: Any, data: TokenDataset, kind: str) -> None:
    """At the last block the offset path runs no block above the cut (only the final norm and the unembedding): its
    loss and the KL of one training step equal plain transformers'."""
    arch, reference, bridge = pair
    last = bridge.cfg.n_layers - 1
    gen = torch.Generator().manual_seed(7)
    if kind == "adapter":
        intervention: Any = RankOneAdapter.for_model(bridge, last, alpha=4.0, seed=7)
        with torch.no_grad():
            intervention.b.copy_(0.5 * torch.randn(intervention.d_model, generator=gen))
    else:
        intervention = SteeringVector(last, bridge.cfg.d_model, hook=kind, alpha=2.0, init=0.5 * torch.randn(bridge.cfg.d_model, generator=gen))
    got = evaluate_loss(bridge, data, intervention)
    assert runner_for(bridge).last_plan.fast, runner_for(bridge).last_plan
    assert got == pytest.approx(reference_loss(reference, data, intervention, surgery=True), **TOL)
    config = TrainConfig(lr=1e-3, max_steps=1, batch_size=len(data), grad_accum=1, kl_weight=1.0, kl_batch_size=len(data), warmup_steps=0, progress=False)
    expected_kl = reference_kl(reference, data, intervention)
    result = train(bridge, intervention, data, config, kl_dataset=data)
    assert result.losses[0]["kl"] == pytest.approx(expected_kl, rel=1e-3, abs=1e-6)
