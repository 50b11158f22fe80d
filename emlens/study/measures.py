"""The study's measurements, each returning one JSON-able result in one format.

``emlens reproduce`` runs them as stages; ``emlens efficiency``, ``stability``,
``pretraining-kl``, ``preference`` and ``drift`` are thin views that call the same functions with the same
defaults (the :mod:`emlens.study.config` sections), print :func:`describe` and write the same result
(:func:`save_result`: a figure, and the JSON beside it). A result is::

    {"measure": NAME, "settings": {...}, "plans": {solution: how it was computed}, ...numbers...}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from emlens.data import TokenDataset
from emlens.interventions import Intervention
from emlens.jsonl import dumps_strict
from emlens.metrics import efficiency, norm_grid, pretraining_significance, stability
from emlens.runner import runner_for
from emlens.study.config import EfficiencySection, PreferenceSection, PretrainingKLSection, StabilitySection


def _plan(model: Any) -> str:
    plan = runner_for(model).last_plan
    return plan.describe() if plan is not None else "not recorded"


def _settings(section: Any, **extra: Any) -> dict[str, Any]:
    return {**dataclasses.asdict(section), **extra}


def measure_efficiency(
    model: Any,
    solutions: Mapping[str, Intervention],
    data: TokenDataset,
    section: EfficiencySection,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Loss on ``data`` with each solution rescaled along a shared norm grid (Fig. 4a)."""
    _one_norm_axis(solutions, "efficiency rescales every solution along one norm grid")
    norms = norm_grid(list(solutions.values()), section.points, section.max_factor)
    common = min(v.norm for v in solutions.values())  # the smaller trained norm, where the report compares them
    curves: dict[str, list[float]] = {}
    at_common: dict[str, float] = {}
    plans: dict[str, str] = {}
    extra = [] if common in norms else [common]  # a grid point already is a measurement there
    for name, solution in solutions.items():
        losses = efficiency(model, solution, data, [*norms, *extra], batch_size, progress)
        curves[name] = losses[: len(norms)]
        at_common[name] = losses[-1] if extra else losses[norms.index(common)]
        plans[name] = _plan(model)
    return {
        "measure": "efficiency",
        "settings": _settings(section, rows=len(data)),
        "norms": norms,
        "loss": curves,
        "at_smallest_norm": {"norm": common, "loss": at_common},  # measured there, not read off the grid
        "solution_norms": {k: v.norm for k, v in solutions.items()},
        "solution_norms_unscaled": {k: v.unscaled_norm for k, v in solutions.items()},  # without alpha / the LoRA scale
        "plans": plans,
    }


def _one_norm_axis(solutions: Mapping[str, Intervention], why: str) -> None:
    """Refuse solutions of different kinds where their norms share one axis: a vector's ``‖αv‖`` and an adapter's
    ``‖ΔW‖_F`` are different quantities, so rescaling one to the other's norm compares nothing."""
    kinds = {v.kind for v in solutions.values()}
    if len(kinds) > 1:
        listed = ", ".join(f"{name} ({v.kind})" for name, v in solutions.items())
        raise ValueError(
            f"{why}, but the solutions are of different kinds ({listed}), whose norms measure different things; measure each kind on its own"
        )


def stability_norms(solutions: Mapping[str, Intervention], rule: str) -> dict[str, float]:
    """The norm each solution is compared at: its own (``own``) or the smallest solution norm (``min``)."""
    if rule == "own":
        return {k: v.norm for k, v in solutions.items()}
    if rule == "min":
        _one_norm_axis(solutions, "stability's norm rule 'min' rescales every solution to the smallest norm ('own' keeps each)")
        smallest = min(v.norm for v in solutions.values())
        return dict.fromkeys(solutions, smallest)
    raise ValueError(f"stability norm rule must be 'min' or 'own', got {rule!r}")


def measure_stability(
    model: Any,
    solutions: Mapping[str, Intervention],
    data: TokenDataset,
    section: StabilitySection,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Loss under norm-preserving orthogonal noise at each ε, per seed (Fig. 4b), plus the relative form."""
    at = stability_norms(solutions, section.norm)
    results: dict[str, Any] = {}
    plans: dict[str, str] = {}
    for name, solution in solutions.items():
        scaled = solution.scaled_to(at[name]) if at[name] != solution.norm else solution
        r = stability(model, scaled, data, section.epsilons, section.seeds, batch_size, progress)
        plans[name] = _plan(model)
        relative = r.relative()
        results[name] = {
            "epsilons": r.epsilons,
            "losses": r.losses.tolist(),
            "base_loss": r.base_loss,
            "relative": relative.tolist(),
            "relative_mean": relative.mean(0).tolist(),
            "relative_std": relative.std(0).tolist(),  # population SD over seeds (ddof=0), as the figures say
        }
    return {
        "measure": "stability",
        "settings": _settings(section, rows=len(data)),
        "norm_rule": section.norm,
        "compared_at_norm": at,
        "results": results,
        "plans": plans,
    }


RANDOM_PREFIX = "random"
"""Names starting with this mark random baselines in results and figures; a solution's name must not (any case)."""


def random_names(n: int) -> list[str]:
    """The names of :func:`random_directions` (``random 1``…), which a solution's name must not take."""
    return [f"{RANDOM_PREFIX} {k + 1}" for k in range(n)]


def random_directions(solution: Intervention, n: int, seed: int = 0) -> dict[str, Intervention]:
    """``n`` random directions of the solution's kind, site and norm (seeds ``seed``…)."""
    return {name: solution.random_like(seed + k) for k, name in enumerate(random_names(n))}


def measure_pretraining_kl(
    model: Any,
    solutions: Mapping[str, Intervention],
    texts: TokenDataset,
    section: PretrainingKLSection,
    batch_size: int = 8,
    progress: bool = True,
    seed: int = 0,
    max_norm: float | None = None,
) -> dict[str, Any]:
    """KL(p_base ‖ p_steered) on plain text at equal norms, for each solution and ``n_random`` random directions (Fig. 6).

    The norms run from 0 to ``max_norm`` (default: ``max_factor`` × the largest solution norm).
    """
    named = dict(solutions)
    taken = [name for name in solutions if name.lower().startswith(RANDOM_PREFIX)]
    if taken:  # the baselines' mean, the report and the figures tell baselines by this prefix
        raise ValueError(
            f"solution name(s) {', '.join(map(repr, taken))} start with {RANDOM_PREFIX!r}, which marks random baselines; rename them"
        )
    if section.n_random:
        spaces = {(v.kind, tuple(v.hook_names())) for v in solutions.values()}
        if len(spaces) > 1:  # the random baseline is drawn in one solution's space: it would not match the others
            listed = "; ".join(f"{name}: {v.kind} at {', '.join(v.hook_names())}" for name, v in solutions.items())
            raise ValueError(
                f"random directions match one kind and site, but these solutions differ ({listed}); measure each kind and "
                "site on its own, or set n_random to 0"
            )
        named.update(random_directions(next(iter(solutions.values())), section.n_random, seed))
    top = max_norm if max_norm is not None else section.max_factor * max(v.norm for v in solutions.values())
    norms = [float(x) for x in np.linspace(0.0, top, section.points)]
    plans: dict[str, str] = {}
    curves = pretraining_significance(model, named, texts, norms, batch_size, progress, plans=plans)
    randoms = [curves[k] for k in random_names(section.n_random)]
    out: dict[str, Any] = {
        "measure": "pretraining_kl",
        "settings": _settings(section, documents=len(texts), seed=seed, max_norm=max_norm),
        "norms": norms,
        "kl": curves,
        "plans": plans,
    }
    if randoms:
        arr = np.asarray(randoms)
        out["random_mean"], out["random_std"] = arr.mean(0).tolist(), arr.std(0).tolist()  # population SD (ddof=0)
    return out


def measure_preference(
    model: Any,
    solutions: Mapping[str, Intervention | None],
    domains: list[str],
    section: PreferenceSection,
    max_length: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Judge-free preference margins per domain on held-out pairs, mean and 95% bootstrap CI over questions."""
    from emlens.preference import preference_table, table_as_dict

    table = preference_table(
        model, dict(solutions), domains, section.rows, section.batch_size, max_length, section.bootstrap, seed, progress=progress
    )
    return {
        "measure": "preference",
        "settings": _settings(section, domains=domains, split="heldout", max_length=max_length),
        "margin": "NLL(reference answer) - NLL(target answer), mean per assistant token; higher: prefers the target (harmful / technical) answer",
        "ci": "95% percentile bootstrap over questions",
        "results": table_as_dict(table),
        "plans": {name: runner_for(model).plan(sol).describe() for name, sol in solutions.items()},  # the rule that chose each path
    }


def measure_drift(
    model: Any,
    data: TokenDataset,
    kl_data: TokenDataset,
    config: Any,
    layer: int | None = None,
    general: Any = None,
    runs: str | Path | None = None,
    intervention: Any = None,
) -> dict[str, Any]:
    """Drift (Fig. 5) of ``intervention`` (default: a new steering vector at ``layer``): :func:`emlens.metrics.drift`
    with ``config`` for both phases.

    ``runs``: a folder where the two runs are saved (``narrow``, ``continued``), recorded in the result.
    """
    from emlens.interventions import SteeringVector
    from emlens.metrics import drift

    start = intervention if intervention is not None else SteeringVector.for_model(model, layer)
    result = drift(model, start, data, kl_data, config, config, general=general)
    out = dict(result.result)
    if runs is not None:
        out["runs"] = {name: str(run.save(Path(runs) / name)) for name, run in (("narrow", result.narrow), ("continued", result.continued))}
    return out


def training_summary(result: Any) -> dict[str, Any]:
    """A training run as JSON: its steps, final losses, norm, the path that trained it, every loss and the checkpoints."""
    last = result.losses[-1]
    return {
        "steps": len(result.losses),
        "final": {k: float(v) for k, v in last.items()},
        "norm": result.intervention.norm,
        "plan": result.plan,
        "losses": result.losses,
        "checkpoints": [s for s, _ in result.trajectory],
    }


def stability_curves(result: dict[str, Any], relative: bool = True) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """Plain ``(epsilons, mean, std)`` per solution from a :func:`measure_stability` result, for plotting."""
    out = {}
    for name, r in result["results"].items():
        values = np.asarray(r["relative"] if relative else r["losses"], dtype=float)
        out[name] = (r["epsilons"], values.mean(0).tolist(), values.std(0).tolist())
    return out


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    """A result as JSON (beside a figure: ``x.png`` → ``x.json``)."""

    path = Path(path).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_strict(result, indent=2, ensure_ascii=False), encoding="utf-8")  # NaN → null
    return path


def describe(result: dict[str, Any]) -> str:
    """A result's main numbers as text (what the command line prints)."""
    m = result["measure"]
    if m == "efficiency":
        lines = ["norm    " + "  ".join(f"{k:>10}" for k in result["loss"])]
        lines += [f"{n:7.2f} " + "  ".join(f"{c[i]:10.4f}" for c in result["loss"].values()) for i, n in enumerate(result["norms"])]
    elif m == "stability":
        lines = [
            f"{name} at norm {result['compared_at_norm'][name]:.3f}: base loss {r['base_loss']:.4f}; relative loss by ε: "
            + ", ".join(f"{e:g}:{v:.1f}" for e, v in zip(r["epsilons"], r["relative_mean"]))
            for name, r in result["results"].items()
        ]
    elif m == "pretraining_kl":
        lines = [f"{k}: " + ", ".join(f"{n:.1f}:{kl:.4f}" for n, kl in zip(result["norms"], kls)) for k, kls in result["kl"].items()]
    elif m == "preference":
        from emlens.preference import format_table, table_from_dict

        lines = [f"{result['margin']}; mean [95% bootstrap CI] over questions", format_table(table_from_dict(result["results"]))]
    else:
        lines = (
            ["cosine to general by checkpoint: " + ", ".join(f"{c:.3f}" for c in result["cosine_to_general"])]
            if "cosine_to_general" in result
            else []
        )
        lines.append(f"explained variance of the PCs: {result['explained_variance_ratio']}")
    return "\n".join(lines)


def save_result(result: dict[str, Any], path: str | Path, relative: bool = True, trained: str | None = None) -> Path:
    """A result's figure at ``path`` and its JSON beside it (returned). ``relative``: stability's relative loss;
    ``trained``: the domain the preference figure marks."""
    from emlens import plotting

    m = result["measure"]
    if m == "efficiency":
        plotting.plot_efficiency(result["norms"], result["loss"], path)
    elif m == "stability":
        plotting.plot_stability(stability_curves(result, relative=relative), path, relative=relative)
    elif m == "pretraining_kl":
        plotting.plot_pretraining_kl(result["norms"], result["kl"], path)
    elif m == "preference":
        from emlens.preference import plot_preference, table_from_dict

        plot_preference(table_from_dict(result["results"]), path, trained=trained)
    else:
        general = np.asarray(result["general_coordinates"]) if result["general_coordinates"] else None
        plotting.plot_drift(np.asarray(result["coordinates"]), result["phase"], result["explained_variance_ratio"], path, general=general)
    return write_result(result, path)
