"""The paper's inductive-bias metrics: efficiency, stability, pre-training significance, and drift.

* **efficiency**: training loss with a solution rescaled to a range of norms.
* **stability**: loss under norm-preserving orthogonal noise ``sqrt(1-ε²)·x + ε·y``.
* **pre-training significance**: ``KL(p_base ‖ p_steered)`` per real token on plain web-style text.
* **drift**: a narrow (KL-regularised) run continued without KL, tracked by PCA of its checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emlens.data import TokenDataset
from emlens.geometry import PCAResult, cosine_similarity, noise_seed, pca
from emlens.interventions import Intervention
from emlens.runner import acts_alike, kl_sweep, loss_sweep, runner_for
from emlens.training import TrainConfig, TrainingCaches, TrainingResult, train
from emlens.validation import check_grid

# the paper's stability grid, defined once: the study's config (emlens/study/config.py) takes it from here
PAPER_EPSILONS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def norm_grid(interventions: Sequence[Intervention], n_points: int = 11, max_factor: float = 2.0) -> list[float]:
    """Evenly spaced norms from 0 to ``max_factor`` × the largest norm among ``interventions``."""
    top = max(i.norm for i in interventions)
    return [float(x) for x in np.linspace(0.0, max_factor * top, n_points)]


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
    """Assistant-token loss on ``dataset`` with ``intervention`` rescaled to each norm (norm 0: the base model, or for a
    composition the parts that do not rescale, e.g. an ablation, alone: :meth:`~emlens.interventions.Intervention.at_norm`).

    Blocks below the intervention run once per batch for the whole sweep (on the fast path).
    """
    norms = check_grid("norms", norms, minimum=0)
    intervention.check_model(model)
    _refuse_zero(intervention, "efficiency")
    points = [intervention.at_norm(n) for n in norms]
    return loss_sweep(model, dataset, points, batch_size, cache_prefix, progress, desc="efficiency")


@dataclass
class StabilityResult:
    """Losses under orthogonal noise: ``losses[seed_index][epsilon_index]``; ``base_loss``: the solution at norm 0
    (the base model; for a composition, its parts that do not rescale, e.g. an ablation, alone)."""

    epsilons: list[float]
    losses: np.ndarray
    base_loss: float

    @property
    def mean(self) -> np.ndarray:
        return self.losses.mean(0)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation over seeds (``ddof=0``; the reports label it so)."""
        return self.losses.std(0)

    @property
    def clean_loss(self) -> float:
        """Loss of the unperturbed solution (ε = 0)."""
        return float(self.losses[:, 0].mean()) if self.epsilons[0] == 0 else float("nan")

    def relative(self) -> np.ndarray:
        """``100·(L_ε − L_0)/(L_base − L_0)`` per seed: 0 = unharmed, 100 = back to the base model's loss.

        NaN for a seed whose solution does not lower the loss below the base model's (``L_0 ≥ L_base``):
        there is no gain to lose, and the quotient would flip sign or divide by zero without a word.
        """
        clean = self.losses[:, :1]
        gain = self.base_loss - clean
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gain > 0, 100.0 * (self.losses - clean) / np.where(gain > 0, gain, 1.0), np.nan)


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
    does not depend on which other ε are in the grid. The noise of seed ``s`` comes from its own stream
    (:func:`~emlens.geometry.noise_seed`), never from the stream that seed ``s`` starts an intervention or
    draws a random baseline with.
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
    points: list[Intervention | None] = [intervention.at_norm(0.0), intervention]
    for seed in seeds:
        # a fresh generator per point: the noise for (seed, ε) is drawn the same way whatever the grid
        points += [intervention.perturbed(eps, torch.Generator().manual_seed(noise_seed(seed))) for eps in epsilons[1:]]
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
    plans: dict[str, str] | None = None,
) -> dict[str, list[float]]:
    """KL from the base model on plain text for each named intervention's direction at each norm.

    Interventions that act the same way (kind and sites) are swept together: the text's prefix
    residuals and the base distribution are computed once for all their points. Each point's KL is
    the same computation as in a sweep of that intervention alone. ``plans``, if given, is filled
    with each name's execution plan (``Plan.describe()``). Norm 0 is the base model (KL 0), or for a composition
    the parts that do not rescale alone (an ablation's own KL).
    """
    norms = check_grid("norms", norms, minimum=0)
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, intervention in interventions.items():
        intervention.check_model(model)
        _refuse_zero(intervention, f"pre-training KL ({name})")
        groups.setdefault(acts_alike(intervention), []).append(name)
    out: dict[str, list[float]] = {}
    for names in groups.values():
        points = [interventions[name].at_norm(n) for name in names for n in norms]
        desc = f"pre-training KL {names[0]}" if len(names) == 1 else f"pre-training KL ({len(names)} directions)"
        flat = kl_sweep(model, texts, points, batch_size, cache_prefix, progress, desc=desc)
        plan = runner_for(model).last_plan
        for k, name in enumerate(names):
            out[name] = flat[k * len(norms) : (k + 1) * len(norms)]
            if plans is not None:
                plans[name] = plan.describe() if plan is not None else "not recorded"
    return {name: out[name] for name in interventions}


@dataclass
class DriftResult:
    """A narrow (KL) run continued without KL, with :func:`continue_without_kl`'s result (PCA and cosines)."""

    narrow: TrainingResult
    continued: TrainingResult
    result: dict[str, Any]

    @property
    def projection(self) -> PCAResult:
        """The PCA of the general run's checkpoints (if given) followed by this run's."""
        coords = np.asarray([*self.result["general_coordinates"], *self.result["coordinates"]])
        return PCAResult(coords, None, np.asarray(self.result["explained_variance_ratio"]))

    @property
    def steps(self) -> list[int]:
        return list(self.result["steps"])

    @property
    def phase(self) -> list[str]:
        return list(self.result["phase"])

    def cosine_to_reference(self) -> list[float]:
        """Cosine of each checkpoint with the general solution (if one was given), in the intervention's own geometry."""
        if "cosine_to_general" not in self.result:
            raise ValueError("no general reference was given")
        return list(self.result["cosine_to_general"])


def drift_geometry(
    continued: TrainingResult, n_narrow: int, general: TrainingResult | None = None, general_final: Intervention | None = None
) -> tuple[dict[str, Any], PCAResult]:
    """One PCA over the continued run's checkpoints (after the general run's, if given), and cosines to the general solution.

    PCA and cosines both use the intervention's own inner product (:func:`emlens.geometry.pca` of
    interventions): for adapters the Frobenius product of the updates, never the factors.
    """
    points = continued.trajectory_interventions()
    general_points = general.trajectory_interventions() if general is not None else []
    reference = general.intervention if general is not None else general_final
    if reference is not None and reference.hook_names() != continued.intervention.hook_names():
        raise ValueError(
            f"the general solution acts at {', '.join(reference.hook_names())} and the drift run at "
            f"{', '.join(continued.intervention.hook_names())}: cosines and one PCA need one site"
        )
    projection = pca([*general_points, *points], n_components=min(3, len(points) + len(general_points)))
    coords = projection.coordinates
    result: dict[str, Any] = {
        "measure": "drift",
        "steps": [s for s, _ in continued.trajectory],
        "phase": ["narrow (KL)"] * n_narrow + ["no KL"] * (len(points) - n_narrow),
        "coordinates": coords[len(general_points) :].tolist(),
        "general_coordinates": coords[: len(general_points)].tolist(),
        "general_steps": [s for s, _ in general.trajectory] if general is not None else [],
        "explained_variance_ratio": projection.explained_variance_ratio.tolist(),
    }
    final = general.intervention if general is not None else general_final
    if final is not None:
        result["cosine_to_general"] = [cosine_similarity(i, final) if i.norm > 0 else float("nan") for i in points]
    return result, projection


def continue_without_kl(
    model: Any,
    narrow: TrainingResult,
    data: TokenDataset,
    config: TrainConfig,
    caches: TrainingCaches | None = None,
    run_dir: str | Path | None = None,
    general: TrainingResult | None = None,
    general_final: Intervention | None = None,
) -> tuple[TrainingResult, dict[str, Any]]:
    """Drift (Fig. 5): continue a narrow run without KL; one PCA over its checkpoints and the general run's.

    ``narrow`` is the narrow run (left untouched), ``config`` the continuation's (its ``kl_weight`` is
    set to 0), ``general`` the general run (its trajectory joins the PCA) or ``general_final`` its final
    intervention (cosines only). ``run_dir`` checkpoints the continuation and resumes it. Returns the
    continued run and the JSON-able result (:func:`drift_geometry`, plus the plans).

    The continuation is a new run that starts at the narrow solution, as a second training job would: a fresh AdamW
    (zero moments) and ``config``'s own schedule (its warm-up, then linear decay; the narrow run's learning rate had
    decayed to about 0), with batches drawn as ``config.seed`` draws them (the narrow run's order when the seeds are
    equal). Its steps are numbered after the narrow run's, so the trajectory and losses read as one run.
    """
    start = TrainingResult(narrow.intervention.clone(), narrow.config, list(narrow.losses), list(narrow.trajectory), narrow.plan)
    free = TrainConfig(**{**config.__dict__, "kl_weight": 0.0})
    intervention = narrow.intervention.clone().to(next(model.parameters()).device)
    continued = train(model, intervention, data, free, resume_from=start, caches=caches, run_dir=run_dir, resume=run_dir is not None)
    result, _ = drift_geometry(continued, len(narrow.trajectory), general, general_final)
    return continued, {**result, "plans": {"narrow": narrow.plan, "continued": continued.plan}}


def drift(
    model: Any,
    intervention: Intervention,
    dataset: TokenDataset,
    kl_dataset: TokenDataset,
    narrow_config: TrainConfig,
    continue_config: TrainConfig,
    general: Intervention | TrainingResult | None = None,
) -> DriftResult:
    """Train narrow (``narrow_config.kl_weight > 0``), then keep training without KL (:func:`continue_without_kl`).

    ``general``: the general solution (cosines) or its whole run (its trajectory joins the PCA too).
    """
    if narrow_config.kl_weight <= 0:
        raise ValueError("the narrow phase needs kl_weight > 0")
    caches = TrainingCaches.for_run(model, intervention, dataset, kl_dataset, narrow_config)  # shared by both phases
    narrow = train(model, intervention, dataset, narrow_config, kl_dataset=kl_dataset, caches=caches)
    snapshot = TrainingResult(narrow.intervention.clone(), narrow.config, list(narrow.losses), list(narrow.trajectory), narrow.plan)
    general_run = general if isinstance(general, TrainingResult) else None
    general_final = general if isinstance(general, Intervention) else None
    free = TrainConfig(**{**continue_config.__dict__, "kl_weight": 0.0})
    continued, result = continue_without_kl(
        model, snapshot, dataset, free, caches if free.cache_prefix else None, general=general_run, general_final=general_final
    )
    return DriftResult(snapshot, continued, result)
