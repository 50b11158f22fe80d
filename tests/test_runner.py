"""The runner's building blocks: packing, plain modules, caches, compile policy, model checks."""

from __future__ import annotations

import shutil

import pytest
import torch

from emlens import RankOneAdapter, SteeringVector, TokenDataset, TrainConfig, train
from emlens.interventions import InterventionError
from emlens.metrics import efficiency, pretraining_significance, stability
from emlens.models import bridge_from_hf, tiny_hf_model, tiny_model
from emlens.runner import ExampleResiduals, packed, runner_for
from emlens.runner.packed import Packing, flash_packed_attention, pack, run_packed, sdpa_packed_attention
from emlens.runner.plain import foreign_hooks
from emlens.training import TrainingCaches, evaluate_loss
from tests.conftest import CONVERSATIONS

FAST = dict(batch_size=2, grad_accum=1, warmup_steps=1, progress=False)


def test_packing_layout():
    p = Packing.from_lengths([3, 1, 2], "cpu")
    assert p.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert (p.total, p.max_len) == (6, 3)
    assert p.repeated(2).lengths == [3, 1, 2, 3, 1, 2]
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert Packing.from_mask(mask).lengths == [3, 1]
    assert pack(torch.arange(8.0).view(2, 4, 1), mask).flatten().tolist() == [0.0, 1.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="at least one token"):
        Packing.from_lengths([2, 0], "cpu")


def test_packed_run_checks_its_rows(model, dataset):
    runner = runner_for(model)
    batch = next(dataset.batches(4))
    assert batch.attention_mask.min() == 0  # the batch really is padded
    rows = runner.residual(batch.input_ids, batch.attention_mask, 2)
    with pytest.raises(ValueError, match="packing holds"):
        run_packed(runner.plain, runner.layers[2:], rows[:-1], Packing.from_mask(batch.attention_mask))
    with pytest.raises(ValueError, match="right-padded"):
        runner.residual(batch.input_ids, batch.attention_mask.flip(1), 2)


@pytest.mark.parametrize("attention", [flash_packed_attention, sdpa_packed_attention])
def test_packed_attention_refuses_missing_packing(attention):
    q, kv = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="without a Packing"):
        attention(torch.nn.Module(), q, kv, kv, None)
    with pytest.raises(RuntimeError, match="no attention mask"):
        attention(torch.nn.Module(), q, kv, kv, torch.ones(1), emlens_packing=Packing.from_lengths([5], "cpu"))


def test_runner_state_lives_on_the_runner_not_the_model(model):
    runner = runner_for(model)
    assert runner is runner_for(model) and runner.plain is runner.plain
    assert not any(k.startswith("_emlens") for k in model.__dict__)
    assert not foreign_hooks(model)


def test_compile_switch(monkeypatch):
    monkeypatch.setenv("EMLENS_COMPILE", "auto")
    assert not packed.compiles_blocks(torch.device("cpu"), 10**10)
    assert not packed.compiles_blocks(torch.device("cuda"), 10**6)  # too small to pay for compiling
    assert packed.compiles_blocks(torch.device("cuda"), 10**10)
    monkeypatch.setenv("EMLENS_COMPILE", "1")
    assert packed.compiles_blocks(torch.device("cpu"), 10)
    monkeypatch.setenv("EMLENS_COMPILE", "0")
    assert not packed.compiles_blocks(torch.device("cuda"), 10**10)
    monkeypatch.setenv("EMLENS_COMPILE", "yes")
    with pytest.raises(ValueError, match="EMLENS_COMPILE"):
        packed.compiles_blocks(torch.device("cpu"), 10)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_blocks_train_like_eager_blocks(monkeypatch):
    model = tiny_model("llama", seed=5)
    data = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS * 2, max_length=128)
    cfg = TrainConfig(lr=1e-3, max_steps=3, batch_size=3, grad_accum=1, warmup_steps=1, progress=False)
    runs = []
    for mode in ("1", "0"):
        monkeypatch.setenv("EMLENS_COMPILE", mode)
        vec = SteeringVector.for_model(model, 2)
        losses = [r["sft"] for r in train(model, vec, data, cfg).losses]
        runs.append((vec.effective.detach(), losses + efficiency(model, vec, data, [0.0, 1.0, 2.0], progress=False)))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-4)
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-5)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_blocks_keep_an_adapters_hooks(monkeypatch):
    """torch.compile does not guard on module hooks: blocks compiled hook-free (a steering vector's run, the
    cache build) must not be reused for the layer that carries an adapter's hook."""
    monkeypatch.setenv("EMLENS_COMPILE", "1")
    model = tiny_model("llama", seed=6)
    data = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS, max_length=128)
    evaluate_loss(model, data, SteeringVector.for_model(model, 1))  # compiles every block without hooks
    adapter = RankOneAdapter.for_model(model, 1, seed=3)
    with torch.no_grad():
        adapter.b.copy_(torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(4)))
    fast = evaluate_loss(model, data, adapter)
    assert runner_for(model).last_plan.path == "prefix"
    assert fast == pytest.approx(evaluate_loss(model, data, adapter, cache_prefix=False), rel=1e-5)
    assert abs(fast - evaluate_loss(model, data, None)) > 1e-3  # the adapter matters
    cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=3, grad_accum=1, warmup_steps=0, progress=False)
    runs = [train(model, RankOneAdapter.for_model(model, 1, seed=3), data, TrainConfig(**{**vars(cfg), "cache_prefix": c})).losses for c in (True, False)]
    assert [r["sft"] for r in runs[0]] == pytest.approx([r["sft"] for r in runs[1]], rel=1e-5)
    assert runs[0][-1]["norm"] > 0 and runs[0][-1]["norm"] == pytest.approx(runs[1][-1]["norm"], rel=1e-4)


def test_device_map_dispatch_hooks_do_not_bypass_the_plain_layers():
    # transformers' device_map wraps each decoder layer's forward (accelerate hooks) before the bridge exists;
    # the hook-free layer copies must run their own forward, not the bridged original's
    hooks = pytest.importorskip("accelerate.hooks")
    hf, tokenizer = tiny_hf_model("llama", seed=2)
    for layer in hf.model.layers:
        hooks.add_hook_to_module(layer, hooks.AlignDevicesHook(execution_device="cpu"))
    model = bridge_from_hf(hf, tokenizer, name="tiny-dispatched")
    data = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS, max_length=128)
    vec = SteeringVector(1, model.cfg.d_model, alpha=1.0, init=torch.randn(model.cfg.d_model))
    assert evaluate_loss(model, data, vec) == pytest.approx(evaluate_loss(model, data, vec, cache_prefix=False), rel=1e-5)


def test_sampling_through_device_map_dispatch_hooks_equals_plain_generate():
    """The slot decoder runs a dispatched model's layers (accelerate's hooks on one device) as plain transformers does."""
    import copy

    from emlens.runner.sampling import SamplingSettings, generate_batch

    hooks = pytest.importorskip("accelerate.hooks")
    hf, tokenizer = tiny_hf_model("llama", seed=2)
    reference = copy.deepcopy(hf)
    for layer in hf.model.layers:
        hooks.add_hook_to_module(layer, hooks.AlignDevicesHook(execution_device="cpu"))
    model = bridge_from_hf(hf, tokenizer, name="tiny-dispatched")
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 61]])
    got = generate_batch(model, ids, torch.ones_like(ids), None, SamplingSettings(12, 0.0), seed=0)
    assert "slot-cache" in runner_for(model).last_plan.reason
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert got.tolist() == expected[:, ids.shape[1]:].tolist()


def new_intervention(model, kind):
    return SteeringVector.for_model(model, 2) if kind == "steering" else RankOneAdapter.for_model(model, 2)


def run_training(model, data, alt, kind, kl_weight, cached=True, caches=None):
    intervention = new_intervention(model, kind)
    cfg = TrainConfig(lr=2e-3, max_steps=3, kl_weight=kl_weight, kl_batch_size=2, cache_prefix=cached, **FAST)
    result = train(model, intervention, data, cfg, kl_dataset=alt if kl_weight else None, caches=caches)
    return result, intervention


@pytest.mark.parametrize("kind", ["steering", "adapter"])
def test_training_caches_are_reusable(model, dataset, kind):
    alt = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS[::-1])
    caches = TrainingCaches.build(model, new_intervention(model, kind), dataset, alt, batch_size=3, progress=False)
    assert caches.sft.cut == (3 if kind == "steering" else 2)
    assert caches.kl is not None and caches.kl.base_rows is not None and len(caches.kl) == len(alt)
    reference, ref_int = run_training(model, dataset, alt, kind, 3.0, cached=False)
    for _ in range(2):  # the same caches serve several runs
        result, got = run_training(model, dataset, alt, kind, 3.0, caches=caches)
        assert [r["sft"] for r in result.losses] == pytest.approx([r["sft"] for r in reference.losses], rel=1e-5)
        assert [r["kl"] for r in result.losses] == pytest.approx([r["kl"] for r in reference.losses], rel=1e-3, abs=1e-8)
        torch.testing.assert_close(got.flatten(), ref_int.flatten(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["steering", "adapter"])
def test_a_shared_residual_store_runs_each_example_once_and_trains_the_same(model, qwen_model, dataset, kind):
    """A second dataset repeating the first one's rows (a mixing set) takes them from the store; training is unchanged."""
    from emlens.runner import ResidualStore

    store = ResidualStore()
    alt = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS[::-1][:4])
    first = TrainingCaches.build(model, new_intervention(model, kind), dataset, batch_size=3, progress=False, store=store)
    assert first.sft.computed == len(dataset)
    combined = TokenDataset([*dataset.examples, *alt.examples, dataset.examples[0]], dataset.pad_token_id)
    caches = TrainingCaches.build(model, new_intervention(model, kind), combined, alt, batch_size=3, progress=False, store=store)
    assert caches.sft.computed == len({tuple(e.input_ids) for e in alt.examples} - {tuple(e.input_ids) for e in dataset.examples})
    assert all(caches.sft.rows[i] is first.sft.rows[i] for i in range(len(dataset)))
    assert caches.sft.rows[-1] is first.sft.rows[0]  # a duplicate row is the same tensor
    assert caches.kl is not None and caches.kl.computed == len(alt)  # their base hidden states were not stored yet
    runner = runner_for(model)
    for i, example in enumerate(combined.examples):  # every served residual is the model's own
        ids = torch.tensor([example.input_ids])
        expected = runner.residual(ids, torch.ones_like(ids), caches.sft.cut)
        torch.testing.assert_close(caches.sft.rows[i], expected, rtol=1e-5, atol=1e-6)
    reference, ref_int = run_training(model, combined, alt, kind, 3.0, cached=False)
    result, got = run_training(model, combined, alt, kind, 3.0, caches=caches)
    assert [r["sft"] for r in result.losses] == pytest.approx([r["sft"] for r in reference.losses], rel=1e-5)
    assert [r["kl"] for r in result.losses] == pytest.approx([r["kl"] for r in reference.losses], rel=1e-3, abs=1e-8)
    torch.testing.assert_close(got.flatten(), ref_int.flatten(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="another model's residuals"):
        ExampleResiduals(qwen_model, dataset, 2, progress=False, store=store)


def test_a_cache_built_for_another_device_gets_its_own_copies_of_stored_rows(model, dataset):
    from emlens.runner import ResidualStore

    store = ResidualStore()
    first = ExampleResiduals(model, dataset, 2, progress=False, store=store)
    moved = ExampleResiduals(model, dataset, 2, device="meta", progress=False, store=store)
    assert moved.computed == 0 and all(r.device.type == "meta" for r in moved.rows)
    assert all(r.device.type == "cpu" for r in first.rows)  # the store's tensors stay where they were


def test_training_caches_refuse_other_runs(model, dataset):
    alt = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS[::-1])
    steering = TrainingCaches.build(model, new_intervention(model, "steering"), dataset, progress=False)
    with pytest.raises(ValueError, match="different dataset"):
        run_training(model, alt, alt, "steering", 0.0, caches=steering)
    with pytest.raises(ValueError, match="block 3 inputs, but block 2"):
        run_training(model, dataset, alt, "adapter", 0.0, caches=steering)
    with pytest.raises(ValueError, match="no KL-set cache"):
        run_training(model, dataset, alt, "steering", 3.0, caches=steering)
    no_base = TrainingCaches(steering.sft, ExampleResiduals(model, alt, 3, progress=False))
    with pytest.raises(ValueError, match="no base hidden states"):
        run_training(model, dataset, alt, "steering", 3.0, caches=no_base)


def test_every_consumer_checks_the_intervention_against_the_model(model, dataset):
    """A layer-9 vector on a 4-layer model is refused by every consumer, with the layer range named."""
    wrong = SteeringVector(9, model.cfg.d_model, hook="blocks.9.hook_resid_post", alpha=1.0)
    calls = [
        lambda: evaluate_loss(model, dataset, wrong),
        lambda: efficiency(model, wrong, dataset, [1.0], progress=False),
        lambda: stability(model, wrong, dataset, [0.0, 0.5], seeds=(0,), progress=False),
        lambda: pretraining_significance(model, {"x": wrong}, dataset, [1.0], progress=False),
        lambda: train(model, wrong, dataset, TrainConfig(max_steps=1, **FAST)),
    ]
    for call in calls:
        with pytest.raises(InterventionError, match="layers 0-3"):
            call()
    nan = SteeringVector(1, model.cfg.d_model, alpha=1.0)
    with torch.no_grad():
        nan.vector[0] = float("nan")
    with pytest.raises(InterventionError, match="NaN"):
        evaluate_loss(model, dataset, nan)
    other = SteeringVector(1, model.cfg.d_model, alpha=1.0, model_name="some-other-model")
    with pytest.warns(UserWarning, match="trained on 'some-other-model'"):
        evaluate_loss(model, dataset, other)
