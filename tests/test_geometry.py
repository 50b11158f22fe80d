import math

import pytest
import torch

from emlens.geometry import (
    baseline_generator,
    cosine_similarity,
    cosine_similarity_matrix,
    mean_difference_direction,
    orthogonal_noise,
    pca,
    rescale,
)
from emlens.interventions import LoRAAdapter, RankOneAdapter, SteeringVector, perturb, random_direction_like
from emlens.runner.activations import collect_activations


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 1.0])
def test_orthogonal_noise_preserves_norm_and_sets_angle(eps):
    x = torch.randn(256)
    y = orthogonal_noise(x, eps, torch.Generator().manual_seed(1))
    assert y.norm().item() == pytest.approx(x.norm().item(), rel=1e-5)
    assert cosine_similarity(x, y) == pytest.approx(math.sqrt(1 - eps**2), abs=1e-5)


def test_orthogonal_noise_draws_again_when_its_draw_lies_along_x():
    """x drawn from seed 0's stream and perturbed with seed 0: the first draw is x's own direction, whose orthogonal
    part is rounding error; scaled up to ‖x‖ it was neither orthogonal nor norm-preserving (norm ratio 1.34)."""
    x = torch.randn(4864, generator=torch.Generator().manual_seed(0)) * 3
    for eps in (0.5, 1.0):
        y = orthogonal_noise(x, eps, torch.Generator().manual_seed(0))
        assert y.norm().item() == pytest.approx(x.norm().item(), rel=1e-5)
        assert cosine_similarity(x, y) == pytest.approx(math.sqrt(1 - eps**2), abs=1e-5)
    vector = SteeringVector(1, 4864, init=torch.ones(4864))
    baseline = vector.random_like(seed=0)
    moved = baseline.perturbed(0.5, baseline_generator(0))  # the baseline's own stream: its first draw is itself
    assert moved.norm == pytest.approx(baseline.norm, rel=1e-5)
    assert cosine_similarity(moved, baseline) == pytest.approx(math.sqrt(0.75), abs=1e-5)


def test_stability_noise_has_a_stream_of_its_own():
    """The seed-s noise never shares seed s's stream, from which interventions start and baselines are drawn."""
    from emlens.geometry import noise_seed

    assert len({noise_seed(s) for s in range(100)} | set(range(100))) == 200
    assert noise_seed(3) == noise_seed(3) and 0 <= noise_seed(0) < 2**63


def test_random_baselines_have_a_stream_of_their_own():
    """A seed-s random baseline is random relative to an adapter started from seed s. Drawn from seed s's own stream
    (the adapter's A is uniform from it, the baseline's Gaussian), its A had cosine -0.33 with the initial A."""
    d_model, d_mlp = 576, 1536
    for seed in range(3):
        adapter = RankOneAdapter(0, d_model, d_mlp, seed=seed)
        with torch.no_grad():
            adapter.b.fill_(1.0)
        baseline = adapter.random_like(seed)
        assert abs(cosine_similarity(adapter.a.detach(), baseline.a.detach())) < 0.1  # ~N(0, 1/sqrt(1536) = 0.026)
        lora = LoRAAdapter({"down_proj": (d_mlp, d_model)}, 0, rank=2, seed=seed)
        (key,) = lora.A.keys()
        with torch.no_grad():
            lora.B[key].fill_(1.0)
        rand = lora.random_like(seed)
        assert abs(cosine_similarity(lora.A[key].detach().flatten(), rand.A[key].detach().flatten())) < 0.1
    assert torch.equal(adapter.random_like(7).a, adapter.random_like(7).a)  # still reproducible


def test_orthogonal_noise_rejects_bad_epsilon():
    with pytest.raises(ValueError, match=r"epsilon must lie in \[0, 1\]"):
        orthogonal_noise(torch.ones(3), 1.5)


def test_cosine_matrix_and_rescale():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    mat = cosine_similarity_matrix([a, b, SteeringVector.from_vector(-a, 0)])
    torch.testing.assert_close(mat, torch.tensor([[1.0, 0.7071068, -1.0], [0.7071068, 1.0, -0.7071068], [-1.0, -0.7071068, 1.0]]))
    assert rescale(b, 2.0).norm().item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="different widths"):
        cosine_similarity(torch.ones(2), torch.ones(3))


def test_adapter_cosine_matches_dense():
    def make(seed):
        ad = RankOneAdapter(0, 6, 10, seed=seed)
        with torch.no_grad():
            ad.b.normal_(generator=torch.Generator().manual_seed(seed + 10))
        return ad

    x, y = make(1), make(2)
    dense = torch.nn.functional.cosine_similarity(x.delta_weight().flatten(), y.delta_weight().flatten(), dim=0)
    assert cosine_similarity(x, y) == pytest.approx(dense.item(), abs=1e-5)
    with pytest.raises((TypeError, ValueError)):
        cosine_similarity(x, torch.ones(6))


def test_perturb_and_random_direction():
    vec = SteeringVector.from_vector(torch.randn(32), 0)
    noisy = perturb(vec, 0.6, torch.Generator().manual_seed(0))
    assert noisy.norm == pytest.approx(vec.norm, rel=1e-5)
    assert cosine_similarity(noisy, vec) == pytest.approx(0.8, abs=1e-5)
    rand = random_direction_like(vec, seed=3)
    assert rand.norm == pytest.approx(vec.norm, rel=1e-5) and abs(cosine_similarity(rand, vec)) < 0.7
    ad = RankOneAdapter(0, 6, 10, seed=1)
    with torch.no_grad():
        ad.b.normal_()
    noisy_ad = perturb(ad, 0.5, torch.Generator().manual_seed(0))
    assert noisy_ad.a.norm().item() == pytest.approx(ad.a.norm().item(), rel=1e-5)
    assert noisy_ad.norm == pytest.approx(ad.norm, rel=1e-4)


def test_pca_recovers_a_line():
    t = torch.linspace(0, 1, 10).unsqueeze(1)
    direction = torch.randn(1, 50)
    points = t * direction + 1e-4 * torch.randn(10, 50)
    result = pca(points, n_components=3)
    assert result.coordinates.shape == (10, 3)
    assert result.explained_variance_ratio[0] > 0.99


def test_mean_difference_direction():
    pos = torch.tensor([[2.0, 0.0], [4.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(mean_difference_direction(pos, neg), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(mean_difference_direction(pos, neg, normalize=False), torch.tensor([3.0, 0.0]))
    with pytest.raises(ValueError, match="equal width"):
        mean_difference_direction(pos, torch.zeros(2, 3))


def test_collect_activations_counts_assistant_tokens(model, dataset):
    acts = collect_activations(model, dataset, "blocks.1.hook_resid_post")
    assert acts.shape == (sum(sum(e.loss_mask) for e in dataset.examples), model.cfg.d_model)
    all_acts = collect_activations(model, dataset, "blocks.1.hook_resid_post", assistant_only=False)
    assert all_acts.shape[0] == sum(len(e.input_ids) for e in dataset.examples)


# --- PCA in each intervention's own geometry (issue 19: drift PCA and cosine agree) -----------------


def _adapter(seed: int, d_model: int = 6, d_mlp: int = 10) -> RankOneAdapter:
    ad = RankOneAdapter(0, d_model, d_mlp, seed=seed)
    with torch.no_grad():
        ad.b.normal_(generator=torch.Generator().manual_seed(seed + 100))
    return ad


def _sklearn_pca(rows: torch.Tensor, k: int):
    from sklearn.decomposition import PCA  # the independent reference

    mat = rows.double().numpy()
    model = PCA(n_components=k, svd_solver="full").fit(mat)
    return model.transform(mat), model.components_, model.explained_variance_ratio_


def _same_up_to_sign(ours, theirs, atol=1e-6):
    import numpy as np

    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    for k in range(ours.shape[-1] if ours.ndim == 2 else 1):
        a, b = (ours[:, k], theirs[:, k]) if ours.ndim == 2 else (ours, theirs)
        sign = 1.0 if abs(a - b).max() <= abs(a + b).max() else -1.0
        np.testing.assert_allclose(a, sign * b, atol=atol)


def test_pca_of_tensors_equals_sklearn():
    rows = torch.randn(12, 7, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.arange(7.0, 0, -1))
    result = pca(rows, n_components=3)
    coords, components, ratio = _sklearn_pca(rows, 3)
    _same_up_to_sign(result.coordinates, coords)
    _same_up_to_sign(result.components.T, components.T)
    assert result.explained_variance_ratio == pytest.approx(ratio, abs=1e-9)


def test_pca_of_rank_one_adapters_is_pca_of_dense_updates():
    adapters = [_adapter(s) for s in range(8)]
    dense = torch.stack([ad.scale * torch.outer(ad.b.detach(), ad.a.detach()).flatten() for ad in adapters])  # by hand
    coords, _, ratio = _sklearn_pca(dense, 3)
    result = pca(adapters, n_components=3)
    assert result.components is None  # from inner products alone: no dense axis is formed
    _same_up_to_sign(result.coordinates, coords, atol=1e-6 * float(dense.abs().max()) * 100)
    assert result.explained_variance_ratio == pytest.approx(ratio, abs=1e-7)  # the dense rows are float32
    # trading scale between a and b changes the factors, not the update: the PCA is unchanged
    traded = [ad.with_factors(ad.a.detach() * 3.0, ad.b.detach() / 3.0) for ad in adapters]
    again = pca(traded, n_components=3)
    _same_up_to_sign(again.coordinates, result.coordinates, atol=1e-4)
    assert again.explained_variance_ratio == pytest.approx(result.explained_variance_ratio, abs=1e-6)  # float32 factors


def test_every_intervention_flattens_in_the_geometry_of_its_inner_product():
    from emlens.interventions import DirectionAblation, LoRAAdapter, MultiLayerSteering

    def lora(seed):
        ad = LoRAAdapter({"down": (5, 7), "q": (5, 5)}, [0, 1], rank=2, seed=seed)
        with torch.no_grad():
            for b in ad.B.values():
                b.normal_(generator=torch.Generator().manual_seed(seed + 50))
        return ad

    pairs = [
        (SteeringVector.from_vector(torch.randn(6), 0), SteeringVector.from_vector(torch.randn(6), 0)),
        (_adapter(1), _adapter(2)),
        (lora(1), lora(2)),
        (
            MultiLayerSteering.from_vectors({0: torch.randn(6), 1: torch.randn(6)}),
            MultiLayerSteering.from_vectors({0: torch.randn(6), 1: torch.randn(6)}),
        ),
        (DirectionAblation(torch.randn(6), ["blocks.0.hook_resid_post"]), DirectionAblation(torch.randn(6), ["blocks.0.hook_resid_post"])),
    ]
    for x, y in pairs:
        flat = float(x.flatten().double() @ y.flatten().double())
        assert x.inner(y) == pytest.approx(flat, rel=1e-5, abs=1e-6), type(x).__name__
        gram = type(x).gram([x, y])
        assert float(gram[0, 1]) == pytest.approx(flat, rel=1e-5, abs=1e-6), type(x).__name__
        assert float(gram[1, 1]) == pytest.approx(float(y.flatten().double().square().sum()), rel=1e-5), type(x).__name__


def test_every_intervention_reports_its_norm_without_its_fixed_scale():
    """The paper reports adapter norms with and without the scale; every kind answers both ways (by hand)."""
    from emlens.interventions import LoRAAdapter, MultiLayerSteering

    vec = SteeringVector.from_vector(torch.randn(6), 0, alpha=4.0)
    assert vec.unscaled_norm == pytest.approx(float(vec.vector.detach().norm()), rel=1e-6)
    ad = _adapter(3)
    assert ad.unscaled_norm == pytest.approx(float(ad.a.detach().norm() * ad.b.detach().norm()), rel=1e-6)
    lora = LoRAAdapter({"down": (5, 7)}, [0, 1], rank=4, alpha=8.0, seed=1)
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_()
    by_hand = sum(float((lora.B[k].detach() @ lora.A[k].detach()).norm()) for k in lora.A) / 2
    assert lora.unscaled_norm == pytest.approx(by_hand, rel=1e-5) and lora.norm == pytest.approx(by_hand * 8.0 / 2.0, rel=1e-5)
    multi = MultiLayerSteering.from_vectors({0: torch.randn(6), 1: torch.randn(6)}, alpha=2.0)
    assert multi.unscaled_norm == pytest.approx(multi.norm / 2.0, rel=1e-6)
    both = vec + ad
    assert both.unscaled_norm == pytest.approx((vec.unscaled_norm**2 + ad.unscaled_norm**2) ** 0.5, rel=1e-6)
