"""Geometry of solutions: cosine similarities, PCA of trajectories, orthogonal noise, directions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from emlens.interventions import Intervention, RankOneAdapter, SteeringVector

VectorLike = Tensor | Intervention


def as_vector(item: VectorLike) -> Float[Tensor, " n"]:
    """A flat float tensor: the effective vector of a steering vector, the raw tensor otherwise."""
    if isinstance(item, SteeringVector):
        return item.effective.detach().float().cpu()
    if isinstance(item, Tensor):
        return item.detach().float().cpu().flatten()
    raise TypeError(f"cannot turn {type(item).__name__} into a vector")


def _inner(x: VectorLike, y: VectorLike) -> float:
    if isinstance(x, RankOneAdapter) and isinstance(y, RankOneAdapter):
        # <s b1 a1ᵀ, s b2 a2ᵀ>_F = s² (b1·b2)(a1·a2): no dense d_model × d_mlp matrix needed
        if x.a.shape != y.a.shape or x.b.shape != y.b.shape:
            raise ValueError("adapters have different shapes")
        return float(x.scale * y.scale * (x.b.detach().float() @ y.b.detach().float()) * (x.a.detach().float() @ y.a.detach().float()))
    if isinstance(x, RankOneAdapter) or isinstance(y, RankOneAdapter):
        raise TypeError("compare adapters with adapters, vectors with vectors")
    vx, vy = as_vector(x), as_vector(y)
    if vx.shape != vy.shape:
        raise ValueError(f"vectors have different widths: {vx.numel()} and {vy.numel()}")
    return float(vx @ vy)


def cosine_similarity(x: VectorLike, y: VectorLike) -> float:
    """Cosine similarity of two vectors, steering vectors, or rank-1 adapters (Frobenius)."""
    denom = (_inner(x, x) * _inner(y, y)) ** 0.5
    if denom == 0:
        raise ValueError("cosine similarity is undefined for a zero vector")
    return _inner(x, y) / denom


def cosine_similarity_matrix(items: Sequence[VectorLike]) -> Float[Tensor, "n n"]:
    """Pairwise cosine similarities of a list of vectors / steering vectors / adapters."""
    n = len(items)
    out = torch.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = cosine_similarity(items[i], items[j])
    return out


def rescale(x: Float[Tensor, " d"], norm: float) -> Float[Tensor, " d"]:
    """``x`` rescaled to the given norm."""
    n = x.norm()
    if n == 0:
        raise ValueError("cannot rescale a zero vector")
    return x * (norm / n)


def orthogonal_noise(
    x: Float[Tensor, " d"], epsilon: float, generator: torch.Generator | None = None
) -> Float[Tensor, " d"]:
    """Norm-preserving perturbation ``sqrt(1-ε²)·x + ε·y`` with ``y ⟂ x``, ``‖y‖ = ‖x‖`` (Gaussian, then orthogonalised)."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
    xf = x.detach().float()
    norm = xf.norm()
    if norm == 0:
        return xf.clone()
    y = torch.randn(xf.shape, generator=generator, dtype=torch.float32, device="cpu").to(xf.device)
    unit = xf / norm
    y = y - (y.flatten() @ unit.flatten()) * unit
    y = y / y.norm() * norm
    return ((1 - epsilon**2) ** 0.5) * xf + epsilon * y


def perturb(intervention: Intervention, epsilon: float, generator: torch.Generator | None = None) -> Intervention:
    """Orthogonal noise on an intervention: the effective vector, or each adapter factor independently."""
    if isinstance(intervention, SteeringVector):
        return intervention.with_effective(orthogonal_noise(intervention.effective, epsilon, generator))
    if isinstance(intervention, RankOneAdapter):
        return intervention.with_factors(
            orthogonal_noise(intervention.a, epsilon, generator), orthogonal_noise(intervention.b, epsilon, generator)
        )
    raise TypeError(f"cannot perturb {type(intervention).__name__}")


def random_direction_like(intervention: Intervention, seed: int = 0) -> Intervention:
    """An intervention of the same kind and norm pointing in a random direction."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(intervention, SteeringVector):
        return intervention.with_effective(rescale(torch.randn(intervention.d_model, generator=gen), intervention.norm))
    if isinstance(intervention, RankOneAdapter):
        rand = intervention.with_factors(torch.randn(intervention.d_mlp, generator=gen), torch.randn(intervention.d_model, generator=gen))
        return rand.scaled_to(intervention.norm)
    raise TypeError(f"cannot draw a random {type(intervention).__name__}")


def mean_difference_direction(
    positive: Float[Tensor, "n_pos d"], negative: Float[Tensor, "n_neg d"], normalize: bool = True
) -> Float[Tensor, " d"]:
    """``mean(positive) − mean(negative)`` (e.g. misaligned minus aligned response activations)."""
    if positive.ndim != 2 or negative.ndim != 2 or positive.shape[1] != negative.shape[1]:
        raise ValueError(
            f"expected two [n, d] activation sets of equal width, got {tuple(positive.shape)} and {tuple(negative.shape)}"
        )
    diff = positive.float().mean(0) - negative.float().mean(0)
    return diff / diff.norm() if normalize and diff.norm() > 0 else diff


@dataclass
class PCAResult:
    """Projection of stacked vectors onto their top principal components."""

    coordinates: np.ndarray  # [n_points, n_components]
    components: np.ndarray  # [n_components, d]
    explained_variance_ratio: np.ndarray  # [n_components]


def pca(vectors: Float[Tensor, "n d"] | Sequence[VectorLike], n_components: int = 3) -> PCAResult:
    """PCA (scikit-learn) of stacked vectors, e.g. a training trajectory's checkpoints."""
    from sklearn.decomposition import PCA

    if not isinstance(vectors, Tensor):
        vectors = torch.stack([as_vector(v) for v in vectors])
    mat = vectors.detach().float().cpu().numpy()
    k = min(n_components, mat.shape[0], mat.shape[1])
    model = PCA(n_components=k).fit(mat)
    return PCAResult(model.transform(mat), model.components_, model.explained_variance_ratio_)


def collect_activations(
    model: Any, dataset: Any, hook_name: str, batch_size: int = 8, assistant_only: bool = True
) -> Float[Tensor, "n_tokens d"]:
    """Activations at ``hook_name`` for every assistant token (or every real token) of ``dataset``."""
    from emlens.interventions import check_hook_name
    from emlens.training import model_device

    check_hook_name(model, hook_name)
    device = model_device(model)
    rows: list[Tensor] = []
    for batch in dataset.batches(batch_size):
        batch = batch.to(device)
        store: dict[str, Tensor] = {}

        def grab(act: Tensor, hook: Any) -> None:
            store["act"] = act.detach()

        with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, grab)]):
            model(batch.input_ids, attention_mask=batch.attention_mask)
        mask = batch.loss_mask if assistant_only else batch.attention_mask.bool()
        rows.append(store["act"][mask].float().cpu())
    return torch.cat(rows)
