"""Geometry of solutions: cosine similarities, PCA of trajectories, orthogonal noise, directions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor


@runtime_checkable
class HasGeometry(Protocol):
    """Anything that knows its own inner product and flat form (every emlens intervention)."""

    def inner(self, other: Any) -> float: ...

    def flatten(self) -> Tensor: ...


VectorLike = Union[Tensor, HasGeometry]  # noqa: UP007 (a runtime alias on Python 3.10)


def as_vector(item: VectorLike) -> Float[Tensor, " n"]:
    """A flat float32 CPU tensor: the tensor itself, or an intervention's :meth:`flatten`."""
    if isinstance(item, Tensor):
        return item.detach().float().cpu().flatten()
    return item.flatten()


def _inner(x: VectorLike, y: VectorLike) -> float:
    if not isinstance(x, Tensor) and not isinstance(y, Tensor):
        return x.inner(y)  # the intervention's own inner product (adapters: Frobenius, no dense matrix)
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


def orthogonal_noise(x: Float[Tensor, " d"], epsilon: float, generator: torch.Generator | None = None) -> Float[Tensor, " d"]:
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


def mean_difference_direction(positive: Tensor, negative: Tensor, normalize: bool = True) -> Float[Tensor, " d"]:
    """``mean(positive) − mean(negative)`` of two ``[n, d]`` activation sets of equal width.

    E.g. misaligned minus aligned response activations. Mismatched shapes raise a ``ValueError``
    naming both (checked here, so any two tensors are accepted).
    """
    if positive.ndim != 2 or negative.ndim != 2 or positive.shape[1] != negative.shape[1]:
        raise ValueError(f"expected two [n, d] activation sets of equal width, got {tuple(positive.shape)} and {tuple(negative.shape)}")
    return _mean_difference(positive.float(), negative.float(), normalize)


def _mean_difference(positive: Float[Tensor, "n_pos d"], negative: Float[Tensor, "n_neg d"], normalize: bool) -> Float[Tensor, " d"]:
    diff = positive.mean(0) - negative.mean(0)
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
