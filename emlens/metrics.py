"""The paper's inductive-bias metrics: efficiency, stability, pre-training significance, and drift.

* **efficiency**: training loss with a solution rescaled to a range of norms.
* **stability**: loss under norm-preserving orthogonal noise ``sqrt(1-ε²)·x + ε·y``.
* **pre-training significance**: ``KL(p_base ‖ p_steered)`` per real token on plain web-style text.
* **drift**: a narrow (KL-regularised) run continued without KL, tracked by PCA of its checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from emlens.data import TokenDataset
from emlens.geometry import PCAResult, pca
from emlens.interventions import Intervention
from emlens.runner import kl_sweep, loss_sweep
from emlens.training import TrainConfig, TrainingCaches, TrainingResult, train
from emlens.validation import check_grid

PAPER_EPSILONS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def norm_grid(interventions: Sequence[Intervention], n_points: int = 11, max_factor: float = 2.0) -> list[float]:
    """Evenly spaced norms from 0 to ``max_factor`` × the largest norm among ``interventions``."""
    top = max(i.norm for i in interventions)
    return [float(x) for x in np.linspace(0.0, max_factor * top, n_points)]


def _at_norm(intervention: Intervention, norm: float) -> Intervention | None:
    return None if norm == 0 else intervention.scaled_to(norm)


def _refuse_zero(intervention: Intervention, metric: str) -> None:
    """A zero intervention has no direction to rescale, perturb or compare; say so instead of returning nan or one point."""
    if intervention.norm == 0:
        raise ValueError(
            f"{metric} needs a {intervention.kind} with a direction, but this one has norm 0 "
            "(untrained, or trained for too few steps to move); train it first"
        )


def efficiency(
    model: Any,
    intervention: Intervention,
    dataset: TokenDataset,
    norms: Sequence[float],
    batch_size: int = 8,
    progress: bool = True,
    cache_prefix: bool = True,
) -> list[float]:
    """Assistant-token loss on ``dataset`` with ``intervention`` rescaled to each norm (norm 0 = base model).

    Blocks below the intervention run once per batch for the whole sweep (on the fast path).
    """
    norms = check_grid("norms", norms, minimum=0)
    intervention.check_model(model)
    _refuse_zero(intervention, "efficiency")
    points = [_at_norm(intervention, n) for n in norms]
    return loss_sweep(model, dataset, points, batch_size, cache_prefix, progress, desc="efficiency")


@dataclass
class StabilityResult:
    """Losses under orthogonal noise: ``losses[seed_index][epsilon_index]``."""

    epsilons: list[float]
    losses: np.ndarray
    base_loss: float

    @property
    def mean(self) -> np.ndarray:
        return self.losses.mean(0)

    @property
    def std(self) -> np.ndarray:
        return self.losses.std(0)

    @property
    def clean_loss(self) -> float:
        """Loss of the unperturbed solution (ε = 0)."""
        return float(self.losses[:, 0].mean()) if self.epsilons[0] == 0 else float("nan")

    def relative(self) -> np.ndarray:
        """``100·(L_ε − L_0)/(L_base − L_0)`` per seed: 0 = unharmed, 100 = back to the base model's loss."""
        clean = self.losses[:, :1]
        return 100.0 * (self.losses - clean) / (self.base_loss - clean)


def stability(
    model: Any,
    intervention: Intervention,
    dataset: TokenDataset,
    epsilons: Sequence[float] = PAPER_EPSILONS,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 8,
    progress: bool = True,
    cache_prefix: bool = True,
) -> StabilityResult:
    """Loss as the solution is rotated away from itself by orthogonal noise of strength ε (norm kept).

    ``epsilons`` are sorted (duplicates refused) and ε = 0 is added when missing. Each seed draws
    one noise direction, the same for every ε of that seed, so the value at a given (seed, ε)
    does not depend on which other ε are in the grid.
    """
    epsilons = sorted(check_grid("epsilons", epsilons, minimum=0, maximum=1))
    if not seeds:
        raise ValueError("stability needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    if epsilons[0] != 0.0:
        epsilons = [0.0] + epsilons
    intervention.check_model(model)
    _refuse_zero(intervention, "stability")
    points: list[Intervention | None] = [None, intervention]
    for seed in seeds:
        # a fresh generator per point: the noise for (seed, ε) is drawn the same way whatever the grid
        points += [intervention.perturbed(eps, torch.Generator().manual_seed(seed)) for eps in epsilons[1:]]
    flat = loss_sweep(model, dataset, points, batch_size, cache_prefix, progress, desc="stability")
    per_seed = len(epsilons) - 1
    table = np.array([[flat[1]] + flat[2 + s * per_seed : 2 + (s + 1) * per_seed] for s in range(len(seeds))])
    return StabilityResult(epsilons, table, flat[0])


def mean_kl(model: Any, intervention: Intervention, dataset: TokenDataset, batch_size: int = 8, cache_prefix: bool = True) -> float:
    """Mean per-token ``KL(p_base ‖ p_steered)`` over the real (non-padding) tokens of ``dataset``."""
    return kl_sweep(model, dataset, [intervention], batch_size, cache_prefix)[0]


def pretraining_significance(
    model: Any,
    interventions: dict[str, Intervention],
    texts: TokenDataset,
    norms: Sequence[float],
    batch_size: int = 8,
    progress: bool = True,
    cache_prefix: bool = True,
) -> dict[str, list[float]]:
    """KL from the base model on plain text for each named intervention's direction at each norm."""
    norms = check_grid("norms", norms, minimum=0)
    out: dict[str, list[float]] = {}
    for name, intervention in interventions.items():
        intervention.check_model(model)
        _refuse_zero(intervention, f"pre-training KL ({name})")
        points = [_at_norm(intervention, n) for n in norms]
        out[name] = kl_sweep(model, texts, points, batch_size, cache_prefix, progress, desc=f"pre-training KL {name}")
    return out


@dataclass
class DriftResult:
    """A narrow run (with KL) continued without KL; PCA of all checkpoints together."""

    narrow: TrainingResult
    continued: TrainingResult
    steps: list[int]
    phase: list[str]
    projection: PCAResult
    general_reference: list[float] | None = field(default=None)

    def cosine_to_reference(self) -> list[float]:
        """Cosine of each checkpoint with a general solution's vector (if one was given)."""
        if self.general_reference is None:
            raise ValueError("no general reference was given")
        ref = torch.tensor(self.general_reference)
        mats = self.continued.trajectory_matrix()
        return [float(torch.nn.functional.cosine_similarity(row, ref, dim=0)) for row in mats]


def drift(
    model: Any,
    intervention: Intervention,
    dataset: TokenDataset,
    kl_dataset: TokenDataset,
    narrow_config: TrainConfig,
    continue_config: TrainConfig,
    general: Intervention | None = None,
    n_components: int = 3,
) -> DriftResult:
    """Train narrow (``narrow_config.kl_weight > 0``), then keep training without KL; PCA the path."""
    if narrow_config.kl_weight <= 0:
        raise ValueError("the narrow phase needs kl_weight > 0")
    caches = TrainingCaches.for_run(model, intervention, dataset, kl_dataset, narrow_config)  # shared by both phases
    narrow = train(model, intervention, dataset, narrow_config, kl_dataset=kl_dataset, caches=caches)
    narrow_snapshot = TrainingResult(narrow.intervention.clone(), narrow.config, list(narrow.losses), list(narrow.trajectory))
    free = TrainConfig(**{**continue_config.__dict__, "kl_weight": 0.0})
    continued = train(model, intervention, dataset, free, resume_from=narrow_snapshot, caches=caches if free.cache_prefix else None)
    steps = [s for s, _ in continued.trajectory]
    n_narrow = len(narrow_snapshot.trajectory)
    phase = ["narrow (KL)"] * n_narrow + ["no KL"] * (len(steps) - n_narrow)
    rows = continued.trajectory_matrix()
    reference = general.flatten().tolist() if general is not None else None
    return DriftResult(narrow_snapshot, continued, steps, phase, pca(rows, n_components), reference)
