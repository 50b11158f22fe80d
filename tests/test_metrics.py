import numpy as np
import pytest
import torch

from emlens.data import TokenDataset, read_texts
from emlens.interventions import RankOneAdapter, SteeringVector
from emlens.metrics import drift, drift_geometry, efficiency, mean_kl, norm_grid, pretraining_significance, stability
from emlens.training import TrainConfig, evaluate_loss, train

FAST = dict(batch_size=2, grad_accum=1, warmup_steps=1, progress=False, checkpoint_every=1)


@pytest.fixture()
def trained(model, dataset):
    vec = SteeringVector.for_model(model, 1)
    train(model, vec, dataset, TrainConfig(lr=2e-3, max_steps=8, **FAST))
    return vec


def test_efficiency_curve(model, dataset, trained):
    norms = norm_grid([trained], n_points=5)
    assert norms[0] == 0 and norms[-1] == pytest.approx(2 * trained.norm)
    losses = efficiency(model, trained, dataset, norms, progress=False)
    assert losses[0] == pytest.approx(evaluate_loss(model, dataset))
    assert losses[2] == pytest.approx(evaluate_loss(model, dataset, trained), rel=1e-5)  # norm = trained norm
    assert losses[2] < losses[0]


def test_stability_curve(model, dataset, trained):
    result = stability(model, trained, dataset, epsilons=[0.1, 0.5, 1.0], seeds=[0, 1], progress=False)
    assert result.epsilons == [0.0, 0.1, 0.5, 1.0]
    assert result.losses.shape == (2, 4)
    assert result.clean_loss == pytest.approx(evaluate_loss(model, dataset, trained))
    rel = result.relative()
    assert np.allclose(rel[:, 0], 0.0)
    assert (result.mean[-1] > result.mean[0]) and (rel[:, -1] > 0).all()
    again = stability(model, trained, dataset, epsilons=[0.1, 0.5, 1.0], seeds=[0, 1], progress=False)
    assert np.array_equal(again.losses, result.losses)  # seeded noise


def test_stability_on_adapter(model, dataset):
    adapter = RankOneAdapter.for_model(model, 1)
    with torch.no_grad():
        adapter.b.normal_(std=0.01)
    result = stability(model, adapter, dataset, epsilons=[0.0, 0.5], seeds=[0], progress=False)
    assert result.losses.shape == (1, 2)


def test_pretraining_kl_on_builtin_web_text(model, trained):
    texts = TokenDataset.from_texts(model.tokenizer, read_texts("web_text", limit=6), max_length=64)
    random_vec = SteeringVector.from_vector(torch.randn(model.cfg.d_model), 1)
    curves = pretraining_significance(model, {"trained": trained, "random": random_vec}, texts, [0.0, 1.0, 4.0], progress=False)
    for name in ("trained", "random"):
        assert curves[name][0] == 0.0 and 0 < curves[name][1] < curves[name][2]
    assert curves["trained"][1] == pytest.approx(mean_kl(model, trained.scaled_to(1.0), texts))


def test_mean_kl_excludes_padding(model):
    texts = ["short", "a much longer document that forces padding onto the short one"]
    vec = SteeringVector.from_vector(torch.randn(model.cfg.d_model), 2)
    ds = TokenDataset.from_texts(model.tokenizer, texts)
    pooled = mean_kl(model, vec, ds, batch_size=2)
    singles = [mean_kl(model, vec, ds.subset([i])) for i in range(2)]
    lengths = [len(e.input_ids) for e in ds.examples]
    assert pooled == pytest.approx(sum(k * n for k, n in zip(singles, lengths)) / sum(lengths), rel=1e-5)


def test_drift_continues_without_kl(model, dataset):
    alt = TokenDataset.from_conversations(model.tokenizer, "kl:medical", limit=6)
    vec = SteeringVector.for_model(model, 1)
    narrow_cfg = TrainConfig(lr=2e-3, max_steps=4, kl_weight=10.0, kl_batch_size=2, **FAST)
    free_cfg = TrainConfig(lr=2e-3, max_steps=4, **FAST)
    result = drift(model, vec, dataset, alt, narrow_cfg, free_cfg, general=SteeringVector.from_vector(torch.randn(model.cfg.d_model), 1))
    assert result.steps == list(range(9))
    assert result.phase.count("narrow (KL)") == 5 and result.phase.count("no KL") == 4
    assert result.projection.coordinates.shape == (9, 3)
    assert len(result.cosine_to_reference()) == 9
    assert "kl" in result.narrow.losses[-1] and "kl" not in result.continued.losses[-1]
    with pytest.raises(ValueError, match="kl_weight > 0"):
        drift(model, vec, dataset, alt, free_cfg, free_cfg)
    with pytest.raises(ValueError, match="need one site"):  # a general solution at another layer
        drift_geometry(result.continued, 5, general_final=SteeringVector.from_vector(torch.randn(model.cfg.d_model), 2))




def test_adapter_drift_uses_the_frobenius_geometry(model, dataset):
    """Drift PCA and cosines of a rank-1 adapter are those of its dense updates (issue 19), checked by hand."""
    from sklearn.decomposition import PCA

    from emlens.interventions import RankOneAdapter

    alt = TokenDataset.from_conversations(model.tokenizer, "kl:medical", limit=6)
    adapter = RankOneAdapter.for_model(model, 1, alpha=4.0, seed=0)
    general = RankOneAdapter.for_model(model, 1, alpha=4.0, seed=1)
    with torch.no_grad():
        general.b.normal_(generator=torch.Generator().manual_seed(3))
    narrow_cfg = TrainConfig(lr=2e-2, max_steps=3, kl_weight=10.0, kl_batch_size=2, **FAST)
    result = drift(model, adapter, dataset, alt, narrow_cfg, TrainConfig(lr=2e-2, max_steps=3, **FAST), general=general)
    points = result.continued.trajectory_interventions()
    dense = torch.stack([p.scale * torch.outer(p.b.detach(), p.a.detach()).flatten().double() for p in points])
    g = (general.scale * torch.outer(general.b.detach(), general.a.detach())).flatten().double()
    want = [float(torch.nn.functional.cosine_similarity(row, g, dim=0)) if row.norm() > 0 else float("nan") for row in dense]
    assert result.cosine_to_reference() == pytest.approx(want, abs=1e-6, nan_ok=True)
    ref = PCA(n_components=3, svd_solver="full").fit(dense.numpy())
    ours = result.projection.coordinates
    theirs = ref.transform(dense.numpy())
    for k in range(3):
        sign = 1.0 if abs(ours[:, k] - theirs[:, k]).max() <= abs(ours[:, k] + theirs[:, k]).max() else -1.0
        assert ours[:, k] == pytest.approx(sign * theirs[:, k], abs=1e-5 * max(1.0, float(abs(theirs).max())))


def test_the_study_efficiency_measures_the_loss_at_the_smaller_solution_norm(model, dataset, trained):
    """The report compares solutions at the smaller trained norm: measured there, not interpolated on the grid."""
    from emlens.study.config import EfficiencySection
    from emlens.study.measures import measure_efficiency

    other = SteeringVector.from_vector(torch.randn(model.cfg.d_model), 1)
    other = other.scaled_to(trained.norm * 1.37)
    result = measure_efficiency(model, {"a": trained, "b": other}, dataset, EfficiencySection(points=4), progress=False)
    at = result["at_smallest_norm"]
    assert at["norm"] == pytest.approx(trained.norm) and at["norm"] not in result["norms"]
    for name, solution in (("a", trained), ("b", other)):
        assert at["loss"][name] == pytest.approx(evaluate_loss(model, dataset, solution.scaled_to(at["norm"])), rel=1e-5)
        assert len(result["loss"][name]) == len(result["norms"]) == 4


def test_relative_stability_is_undefined_for_a_seed_without_a_gain_over_the_base_model():
    """L_0 ≥ L_base: no gain to lose; the quotient would divide by zero or flip its sign, so it is NaN."""
    from emlens.metrics import StabilityResult

    losses = np.array([[3.0, 3.5, 4.0], [4.2, 4.3, 4.4], [4.0, 4.1, 4.2]])  # seeds: a gain of 1, a loss of 0.2, none
    rel = StabilityResult([0.0, 0.5, 1.0], losses, base_loss=4.0).relative()
    assert rel[0].tolist() == pytest.approx([0.0, 50.0, 100.0])
    assert np.isnan(rel[1]).all() and np.isnan(rel[2]).all()


def test_pretraining_kl_refuses_a_random_baseline_for_solutions_of_different_kinds(model):
    """The random directions are drawn in one solution's kind and site: for a vector and an adapter together they would be
    no baseline for one of them, so the measure asks for one kind at a time (or none)."""
    from emlens.study.config import PretrainingKLSection
    from emlens.study.measures import measure_pretraining_kl

    texts = TokenDataset.from_texts(model.tokenizer, ["some plain text to read", "and another line"], max_length=16)
    vector = SteeringVector(1, model.cfg.d_model, alpha=1.0, init=torch.randn(model.cfg.d_model))
    adapter = RankOneAdapter.for_model(model, 1, seed=0)
    with torch.no_grad():
        adapter.b.normal_()
    with pytest.raises(ValueError, match=r"random directions match one kind and site, but these solutions differ"):
        measure_pretraining_kl(model, {"vector": vector, "adapter": adapter}, texts, PretrainingKLSection(points=2, n_random=2), progress=False)
    out = measure_pretraining_kl(model, {"vector": vector, "adapter": adapter}, texts, PretrainingKLSection(points=2, n_random=0), progress=False)
    assert set(out["kl"]) == {"vector", "adapter"}
