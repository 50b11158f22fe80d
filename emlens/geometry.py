"""Geometry of solutions: cosine similarities, PCA of trajectories, orthogonal noise, directions."""

from __future__ import annotations

import hashlib
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
    """Norm-preserving perturbation ``sqrt(1-ε²)·x + ε·y`` with ``y ⟂ x``, ``‖y‖ = ‖x‖`` (Gaussian, then orthogonalised).

    The projection runs in float64, twice, so ``y`` is orthogonal to rounding. A draw (nearly) parallel to ``x``,
    whose orthogonal part would be mostly rounding error, is drawn again from the same generator: that happens
    when ``x`` itself was drawn from the generator's own stream (a random baseline perturbed with its own generator).
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
    xf = x.detach().float()
    if xf.norm() == 0:
        return xf.clone()
    x64 = xf.cpu().double()  # on the CPU first: MPS has no float64
    norm = x64.norm()
    unit = (x64 / norm).flatten()
    for _ in range(_MAX_DRAWS):
        y = torch.randn(xf.shape, generator=generator, dtype=torch.float32, device="cpu").double()
        drawn = y.norm()
        for _ in range(2):  # a second pass removes what the first one's rounding left along x
            y = y - (y.flatten() @ unit) * unit.view(y.shape)
        if y.norm() > _MIN_ORTHOGONAL_PART * drawn:
            break
    else:
        raise ValueError(f"{_MAX_DRAWS} Gaussian draws all lay along x: the generator does not give independent draws")
    y = y / y.norm() * norm
    return (((1 - epsilon**2) ** 0.5) * x64 + epsilon * y).to(device=xf.device, dtype=torch.float32)


def _stream_seed(purpose: str, seed: int) -> int:
    digest = hashlib.sha256(f"emlens {purpose} {int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def part_seed(seed: int, part: int) -> int:
    """The seed of part ``part`` of a composition's ``random_like(seed)``: distinct for every ``(seed, part)``."""
    return _stream_seed(f"composition part {int(part)}", seed)


def noise_seed(seed: int) -> int:
    """The generator seed of :func:`~emlens.metrics.stability`'s noise for ``seed``: a stream of its own.

    Interventions start from ``torch.Generator().manual_seed(seed)``; noise from that same stream is not random
    relative to them (a LoRA adapter's initial ``A`` and the seed-0 noise have cosine about −0.34). Random baselines
    draw from a third stream (:func:`baseline_generator`), so noise is not random relative to them either.
    """
    return _stream_seed("stability noise", seed)


def baseline_generator(seed: int) -> torch.Generator:
    """The generator every ``random_like(seed)`` draws from: a stream of its own for random baselines.

    An adapter starts from ``torch.Generator().manual_seed(seed)`` (its ``A`` uniform); a baseline drawn from that
    same stream came out correlated with it (cosine −0.33 between the initial ``A`` and the seed-0 baseline's, and
    −0.27 with the trained one's), which made that baseline's pre-training KL about 10% higher than the others'.
    """
    return torch.Generator().manual_seed(_stream_seed("random baseline", seed))


_MAX_DRAWS = 8
_MIN_ORTHOGONAL_PART = 1e-3  # a draw whose part orthogonal to x is below this share of its norm is drawn again


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
    """Projection of stacked points onto their top principal components.

    ``components`` holds the principal axes in the points' own coordinates; it is ``None`` when the
    PCA was computed from inner products alone (:func:`pca` of interventions), where no axis is formed.
    Each axis's sign is fixed so that, along it, the point farthest from the centre (the largest coordinate in
    absolute value) has a positive coordinate.
    """

    coordinates: np.ndarray  # [n_points, n_components]
    components: np.ndarray | None  # [n_components, d], or None
    explained_variance_ratio: np.ndarray  # [n_components]


def gram_matrix(items: Sequence[VectorLike]) -> Float[Tensor, "n n"]:
    """Pairwise inner products (float64): tensors by their dot product, interventions by their own.

    Interventions of one kind go through their class's ``gram`` (one matrix product where the
    kind allows, e.g. the Frobenius products of rank-1 updates without forming them).
    """
    if not items:
        raise ValueError("no points given")
    if all(isinstance(i, Tensor) for i in items):
        mat = torch.stack([as_vector(i) for i in items]).double()
        return mat @ mat.T
    gram = getattr(type(items[0]), "gram", None)
    if gram is not None and all(type(i) is type(items[0]) for i in items):
        return gram(items)
    n = len(items)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = _inner(items[i], items[j])
    return out


def pca_from_gram(gram: Float[Tensor, "n n"], n_components: int = 3) -> PCAResult:
    """PCA of points known only by their inner products (``gram[i, j] = <x_i, x_j>``).

    Equal to the PCA of the points themselves (same coordinates up to each component's sign, same
    explained-variance ratios): the centred Gram matrix ``H G H`` has the eigenvalues of the scatter
    matrix, and ``U √Λ`` are the centred points' coordinates on its axes.
    """
    g = gram.detach().double().cpu()
    n = g.shape[0]
    if g.shape != (n, n):
        raise ValueError(f"a Gram matrix must be square, got {tuple(g.shape)}")
    centred = g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()
    centred = (centred + centred.T) / 2
    values, vectors = torch.linalg.eigh(centred)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order].clamp_min(0), vectors[:, order]
    k = min(n_components, n)
    coords = vectors[:, :k] * values[:k].sqrt()
    signs = torch.sign(coords.gather(0, coords.abs().argmax(0, keepdim=True)))
    coords = coords * torch.where(signs == 0, torch.ones_like(signs), signs)
    total = float(centred.trace())
    ratio = (values[:k] / total).numpy() if total > 0 else np.zeros(k)
    return PCAResult(coords.numpy(), None, ratio)


def pca(vectors: Float[Tensor, "n d"] | Sequence[VectorLike], n_components: int = 3) -> PCAResult:
    """PCA of stacked vectors, or of interventions in their own geometry (e.g. a trajectory's checkpoints).

    Interventions are never flattened: their PCA comes from their inner products
    (:func:`gram_matrix`, :func:`pca_from_gram`), so PCA and cosine similarity use one geometry, and
    a rank-1 adapter's PCA does not change when ``a`` is scaled up and ``b`` down.
    """
    if not isinstance(vectors, Tensor) and any(not isinstance(v, Tensor) for v in vectors):
        return pca_from_gram(gram_matrix(vectors), n_components)
    if not isinstance(vectors, Tensor):
        vectors = torch.stack([as_vector(v) for v in vectors])
    mat = vectors.detach().double().cpu()
    if mat.ndim != 2:
        raise ValueError(f"expected stacked vectors [n, d], got shape {tuple(mat.shape)}")
    result = pca_from_gram(mat @ mat.T, min(n_components, mat.shape[1]))
    centred = mat - mat.mean(0, keepdim=True)
    values = torch.from_numpy(result.coordinates)
    sq = values.pow(2).sum(0)  # ‖coordinates_k‖² = λ_k, and axis_k = centredᵀ coordinates_k / λ_k
    axes = (values / torch.where(sq > 0, sq, torch.ones_like(sq))).T @ centred
    return PCAResult(result.coordinates, axes.numpy(), result.explained_variance_ratio)
