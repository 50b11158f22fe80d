"""The cached-prefix fast path must give the full path's results (within float tolerance)."""

import pytest
import torch

from emlens.data import TokenDataset
from emlens.interventions import RankOneAdapter, SteeringVector
from emlens.metrics import efficiency, mean_kl, pretraining_significance, stability
from emlens.prefix_cache import ExampleResiduals, PrefixCache, logits_from_layer, residual_at
from emlens.training import TrainConfig, evaluate_loss, forward_logits, train
from tests.conftest import CONVERSATIONS


def interventions(model, layer=2):
    vec = SteeringVector.from_vector(torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)), layer)
    pre = SteeringVector.from_vector(vec.effective, layer, hook="resid_pre")
    adapter = RankOneAdapter.for_model(model, layer, seed=1)
    with torch.no_grad():
        adapter.b.normal_(generator=torch.Generator().manual_seed(2))
    return [vec, pre, adapter]


@pytest.mark.parametrize("arch", ["model", "qwen_model"])
def test_suffix_logits_equal_full_logits(request, arch, dataset):
    model = request.getfixturevalue(arch)
    batch = next(dataset.batches(4))
    for iv in interventions(model):
        resid = residual_at(model, batch, iv.layer)
        with iv.applied(model):
            full = forward_logits(model, batch)
            fast = logits_from_layer(model, resid, batch.attention_mask, iv.layer)
        real = batch.attention_mask.bool()  # padding rows are not computed meaningfully on the fast path
        torch.testing.assert_close(fast[real], full[real], atol=1e-5, rtol=1e-5)
    assert len(model.original_model.model.layers) == model.cfg.n_layers  # layer stack restored


def test_prefix_cache_reuses_batches(model, dataset):
    cache = PrefixCache(model, 2)
    vec = interventions(model)[0]
    losses = [evaluate_loss(model, dataset, vec.scaled_to(n), batch_size=2, prefix=cache) for n in (1.0, 2.0)]
    assert len(cache) == 2  # two batches, computed once for both sweep points
    assert losses[0] == pytest.approx(evaluate_loss(model, dataset, vec.scaled_to(1.0), batch_size=2), rel=1e-5)
    with pytest.raises(ValueError, match="above the intervention's layer"):
        evaluate_loss(model, dataset, SteeringVector(1, model.cfg.d_model), prefix=cache)


def test_example_residuals_repad(model, dataset):
    cache = ExampleResiduals(model, dataset, 2, batch_size=3, progress=False)
    idx = [3, 0]
    from emlens.data import collate

    batch = collate([dataset.examples[i] for i in idx], dataset.pad_token_id)
    resid = residual_at(model, batch, 2)
    got = cache.batch(idx, batch.input_ids.shape[1])
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], resid[mask], atol=1e-6, rtol=1e-5)


def new_intervention(model, kind):
    return SteeringVector.for_model(model, 2) if kind == "steering" else RankOneAdapter.for_model(model, 2, seed=3)


def run_training(model, dataset, alt, kind, kl_weight, **kwargs):
    iv = new_intervention(model, kind)
    cfg = TrainConfig(lr=1e-3, max_steps=4, batch_size=2, grad_accum=2, warmup_steps=1, kl_weight=kl_weight,
                      kl_batch_size=2, progress=False, cache_prefix=kwargs.pop("cached", True))
    res = train(model, iv, dataset, cfg, kl_dataset=alt if kl_weight else None, **kwargs)
    return torch.cat([p.detach().flatten() for p in iv.parameters()]), res.losses


def assert_same_run(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-4)
    for x, y in zip(a[1], b[1]):
        assert x["sft"] == pytest.approx(y["sft"], rel=1e-5)
        if "kl" in x:
            assert x["kl"] == pytest.approx(y["kl"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("kind", ["steering", "adapter"])
@pytest.mark.parametrize("kl_weight", [0.0, 3.0])
def test_cached_training_matches_full_training(model, dataset, kind, kl_weight):
    # steering: residual after block 2 cached, packed upper blocks; adapter: block 2 hooked on cached inputs
    alt = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS[::-1])
    assert_same_run(run_training(model, dataset, alt, kind, kl_weight, cached=True),
                    run_training(model, dataset, alt, kind, kl_weight, cached=False))


@pytest.mark.parametrize("kind", ["steering", "adapter"])
def test_training_caches_are_reusable(model, dataset, kind):
    from emlens.training import TrainingCaches, cache_layer

    alt = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS[::-1])
    caches = TrainingCaches.build(model, new_intervention(model, kind), dataset, alt, batch_size=3, progress=False)
    assert caches.sft.layer == cache_layer(model, new_intervention(model, kind)) == (3 if kind == "steering" else 2)
    assert caches.kl.base_rows is not None and len(caches.kl) == len(alt)
    reference = run_training(model, dataset, alt, kind, 3.0, cached=False)
    for _ in range(2):  # the same caches serve several runs
        assert_same_run(run_training(model, dataset, alt, kind, 3.0, caches=caches), reference)
    assert_same_run(run_training(model, dataset, alt, kind, 0.0, caches=caches),
                    run_training(model, dataset, alt, kind, 0.0, cached=False))


def test_training_caches_refuse_other_runs(model, dataset):
    from emlens.training import TrainingCaches

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
    with pytest.raises(ValueError, match="block 0"):
        TrainingCaches.build(model, SteeringVector(0, model.cfg.d_model, hook="resid_pre"), dataset, progress=False)


def test_cached_sweeps_match_full_sweeps(model, dataset):
    vec, _, adapter = interventions(model)
    for iv in (vec, adapter):
        norms = [0.0, iv.norm / 2, iv.norm]
        torch.testing.assert_close(
            torch.tensor(efficiency(model, iv, dataset, norms, progress=False)),
            torch.tensor(efficiency(model, iv, dataset, norms, progress=False, cache_prefix=False)), rtol=1e-5, atol=1e-6)
        a = stability(model, iv, dataset, [0.5, 1.0], seeds=[0], progress=False)
        b = stability(model, iv, dataset, [0.5, 1.0], seeds=[0], progress=False, cache_prefix=False)
        assert a.losses == pytest.approx(b.losses, rel=1e-5)
    texts = TokenDataset.from_texts(model.tokenizer, ["some web text here", "and another longer document, with padding"])
    fast = pretraining_significance(model, {"v": vec}, texts, [1.0, 3.0], progress=False)
    slow = pretraining_significance(model, {"v": vec}, texts, [1.0, 3.0], progress=False, cache_prefix=False)
    assert fast["v"] == pytest.approx(slow["v"], rel=1e-4)
    assert mean_kl(model, vec, texts) == pytest.approx(mean_kl(model, vec, texts, prefix=PrefixCache(model, 2)), rel=1e-4)


@pytest.mark.parametrize("layer", [1, 3])  # 3 = the last block: only the final norm and unembedding follow
def test_steering_sweep_losses_match_hooked_losses(model, dataset, layer):
    from emlens.prefix_cache import steering_sweep_losses

    gen = torch.Generator().manual_seed(layer)
    vectors = [torch.zeros(model.cfg.d_model)] + [torch.randn(model.cfg.d_model, generator=gen) * s for s in (1.0, 3.0, 6.0)]
    fast = steering_sweep_losses(model, vectors, layer, dataset, batch_size=3, max_rows=4)  # several passes per batch
    slow = [evaluate_loss(model, dataset, SteeringVector.from_vector(v, layer), batch_size=3) for v in vectors]
    assert fast == pytest.approx(slow, rel=1e-5)
    assert fast[0] == pytest.approx(evaluate_loss(model, dataset), rel=1e-5)
