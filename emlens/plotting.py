"""Matplotlib figures in the style of the paper's Figs. 4a, 4b, 5 and 6, and of its judged evaluations, saved to PNG.

Every function takes plain data (numbers, lists, mappings): plotting imports nothing else from
emlens, so the modules that compute the numbers depend on it and never the other way round.
A solution keeps one colour in every figure (:func:`colour_of`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_FIXED = {"general": "tab:red", "narrow": "tab:blue", "base": "tab:gray", "continued": "tab:purple"}
_CYCLE = ["tab:green", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


_DARK = {"general": "darkred", "narrow": "navy", "continued": "indigo"}


NORM_LABEL = "solution norm (‖α·v‖, or mean over modules of ‖s·B·A‖_F)"


def _role(name: str) -> str | None:
    key = name.lower()
    for stem in _FIXED:
        if key == stem or key.endswith(f" {stem}") or key.startswith(f"{stem} ") or key.endswith(f"/{stem}") or f" {stem} " in key:
            return stem
    return None


def colour_of(name: str) -> str:
    """One colour per solution name across all figures: general red, narrow blue (darker for adapters), base grey, random light grey."""
    key, role = name.lower(), _role(name)
    if role is not None:
        return _DARK[role] if "adapter" in key and role in _DARK else _FIXED[role]
    if key.startswith("random"):
        return "silver"
    return _CYCLE[sum(map(ord, key)) % len(_CYCLE)]


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (parents created, tight layout so nothing is clipped, 130 dpi) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def _curves(xs: Sequence[float], curves: Mapping[str, Sequence[float]], path: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, ys in curves.items():
        random = name.lower().startswith("random")
        ax.plot(xs, ys, marker="" if random else "o", color=colour_of(name), label=name, linewidth=1 if random else 1.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_efficiency(
    norms: Sequence[float], curves: Mapping[str, Sequence[float]], path: str | Path, title: str = "Efficiency (Fig. 4a)"
) -> Path:
    """Loss vs norm for several solutions (lower at equal norm = more efficient)."""
    return _curves(
        norms,
        curves,
        path,
        NORM_LABEL,
        "loss (nats per assistant token)",
        title,
    )


def plot_stability(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    path: str | Path,
    relative: bool = True,
    title: str = "Stability (Fig. 4b)",
) -> Path:
    """``curves[name] = (epsilons, mean, std over seeds)``: loss (or relative loss) vs orthogonal-noise strength ε."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (eps, mean, std) in curves.items():
        m, s = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
        ax.plot(eps, m, marker="o", color=colour_of(name), label=f"{name} (mean ± population SD over seeds)")
        ax.fill_between(eps, m - s, m + s, alpha=0.2, color=colour_of(name))
    ylabel = "relative loss 100·(L_ε − L_0)/(L_base − L_0) (%)" if relative else "loss (nats per assistant token)"
    ax.set(xlabel="noise strength ε (x' = √(1−ε²)·x + ε·y)", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_pretraining_kl(
    norms: Sequence[float], curves: Mapping[str, Sequence[float]], path: str | Path, title: str = "Pre-training significance (Fig. 6)"
) -> Path:
    """KL(p_base ‖ p_steered) on web text vs norm, per direction."""
    return _curves(
        norms,
        curves,
        path,
        NORM_LABEL,
        "mean KL(p_base ‖ p_steered) on web text (nats per token)",
        title,
    )


def plot_trajectories(
    paths: Mapping[str, np.ndarray],
    explained: Sequence[float],
    path: str | Path,
    title: str,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Checkpoint trajectories in the plane of the first two principal components of a joint PCA.

    ``paths[name]`` holds one row of PC coordinates per checkpoint, in order; each starts with a
    hollow marker and ends with a filled one.
    """
    fig, ax = plt.subplots(figsize=(5.8, 4.6))
    for k, (name, coords) in enumerate(paths.items()):
        coords = np.asarray(coords, dtype=float)
        ys = coords[:, 1] if coords.shape[1] > 1 else np.zeros(len(coords))
        colour = colour_of(name) if _role(name) is not None else plt.get_cmap("viridis")(k / max(1, len(paths) - 1))
        ax.plot(coords[:, 0], ys, marker=".", color=colour, label=(labels or {}).get(name, name))
        ax.scatter(coords[:1, 0], ys[:1], s=60, facecolors="none", edgecolors=colour, linewidths=1.5, zorder=3)
        ax.scatter(coords[-1:, 0], ys[-1:], s=60, color=colour, edgecolor="black", zorder=3)
    ax.scatter([], [], s=60, facecolors="none", edgecolors="0.3", linewidths=1.5, label="start of run")
    ax.scatter([], [], s=60, color="0.6", edgecolor="black", label="end of run")
    ax.set(
        xlabel=f"PC1 ({100 * explained[0]:.0f}% of variance)",
        ylabel=f"PC2 ({100 * explained[1]:.0f}% of variance)" if len(explained) > 1 else "PC2",
        title=title,
    )
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_drift(
    coords: np.ndarray,
    phases: Sequence[str],
    explained: Sequence[float],
    path: str | Path,
    general: np.ndarray | None = None,
    title: str = "Drift without the KL term (Fig. 5)",
) -> Path:
    """The narrow run (KL) and its no-KL continuation in PC space, with the general run's path in the same axes."""
    coords = np.asarray(coords, dtype=float)
    n_narrow = list(phases).count("narrow (KL)")
    paths = {"narrow (KL)": coords[:n_narrow], "continued (no KL)": coords[max(0, n_narrow - 1) :]}
    if general is not None:
        paths = {"general (no KL)": np.asarray(general, dtype=float), **paths}
    fig, ax = plt.subplots(figsize=(5.8, 4.6))
    colours = {"general (no KL)": colour_of("general"), "narrow (KL)": colour_of("narrow"), "continued (no KL)": colour_of("continued")}
    for name, c in paths.items():
        ys = c[:, 1] if c.shape[1] > 1 else np.zeros(len(c))
        ax.plot(c[:, 0], ys, marker="o", markersize=4, color=colours[name], label=name)
        ax.scatter(c[-1:, 0], ys[-1:], s=70, color=colours[name], edgecolor="black", zorder=3)
    ax.annotate("start", (coords[0, 0], coords[0, 1] if coords.shape[1] > 1 else 0.0), textcoords="offset points", xytext=(5, 5))
    ax.set(
        xlabel=f"PC1 ({100 * explained[0]:.0f}% of variance)",
        ylabel=f"PC2 ({100 * explained[1]:.0f}% of variance)" if len(explained) > 1 else "PC2",
        title=title,
    )
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_mixing(
    ratios: Sequence[float],
    curves: Mapping[str, Sequence[tuple[float, float, float]]],
    path: str | Path,
    ylabel: str = "preference shift vs base (nats per token)",
    title: str = "Mixing baseline: aligned data from other domains, no KL",
) -> Path:
    """``curves[label] = [(mean, lo, hi) per ratio]``: e.g. the in-domain and the mean out-of-domain shift."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    styles = ["-", "--", ":", "-."]
    for k, (label, points) in enumerate(curves.items()):
        arr = np.asarray(points, dtype=float)
        ax.errorbar(
            ratios,
            arr[:, 0],
            yerr=[arr[:, 0] - arr[:, 1], arr[:, 2] - arr[:, 0]],
            marker="o",
            capsize=3,
            linestyle=styles[k % 4],
            label=label,
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel="share of aligned rows from other domains", ylabel=ylabel, title=title)
    ax.legend(fontsize=8, title="95% bootstrap CI", title_fontsize=7)
    return save_figure(fig, path)


def plot_preference(
    table: Mapping[str, Mapping[str, tuple[float, float, float]]],
    path: str | Path,
    ylabel: str = "NLL(correct) − NLL(harmful) (nats per token)",
    title: str = "Preference for the harmful answer",
    trained: str | None = None,
) -> Path:
    """Grouped bars: ``table[solution][domain] = (mean, lo, hi)``, 95% bootstrap CIs; ``trained`` domain marked."""
    names = list(table)
    domains = list(dict.fromkeys(d for row in table.values() for d in row))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(domains) + 0.3 * len(names), 4))
    xs = np.arange(len(domains))
    others = [n for n in names if _role(n) is None and not n.lower().startswith("random")]
    palette = plt.get_cmap("tab20")
    for k, name in enumerate(names):
        row = table[name]
        means = np.array([row[d][0] if d in row else np.nan for d in domains])
        lo = np.array([row[d][0] - row[d][1] if d in row else 0.0 for d in domains])
        hi = np.array([row[d][2] - row[d][0] if d in row else 0.0 for d in domains])
        colour = palette(others.index(name) % 20) if name in others else colour_of(name)  # sweep points: one colour each
        ax.bar(xs + (k - (len(names) - 1) / 2) * width, means, width, yerr=np.vstack([lo, hi]), capsize=2, label=name, color=colour)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ticks = [f"{d}\n(trained)" if d == trained else d for d in domains]
    ax.set_xticks(xs, ticks)
    if trained in domains:
        ax.axvspan(domains.index(trained) - 0.45, domains.index(trained) + 0.45, color="gold", alpha=0.15, lw=0, zorder=0)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8, title="error bars: 95% bootstrap CI", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def plot_grid(
    values: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str,
    colour_label: str,
    symmetric: bool = True,
    xlabel: str = "evaluated on",
    ylabel: str = "trained on",
    fmt: str = "{:+.2f}",
    trained: str | None = None,
) -> Path:
    """Heat map ``values[row][column]``; the trained domain's cells are outlined: column ``trained`` in every row when
    given (rows named by solution), else each row's own domain (rows named by their training domain)."""
    rows = list(values)
    cols = list(dict.fromkeys(c for row in values.values() for c in row))
    arr = np.array([[values[r].get(c, np.nan) for c in cols] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.8 + 1.2 * len(cols), 1.4 + 0.6 * len(rows)))
    if symmetric:
        bound = float(np.nanmax(np.abs(arr))) if np.isfinite(arr).any() else 1.0
        image = ax.imshow(arr, cmap="RdBu_r", vmin=-(bound or 1.0), vmax=bound or 1.0)
    else:
        image = ax.imshow(arr, cmap="Reds", vmin=0.0, vmax=1.0)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax.text(j, i, "n/a" if np.isnan(arr[i, j]) else fmt.format(arr[i, j]), ha="center", va="center", fontsize=9)
            if c == (trained if trained is not None else r.split(" ")[0]):
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(image, ax=ax, label=colour_label)
    return save_figure(fig, path)


def plot_rate_grid(
    rates: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str = "Judged misalignment rate",
    xlabel: str = "evaluated on",
    ylabel: str = "trained on",
) -> Path:
    """Heat map of rates in [0, 1]: rows (solutions by training domain) × columns (evaluation domains)."""
    return plot_grid(rates, path, title, "rate (share of scored answers)", symmetric=False, xlabel=xlabel, ylabel=ylabel, fmt="{:.2f}")


def plot_quadrants(
    series: Mapping[str, Sequence[tuple[float | None, float | None]]],
    path: str | Path,
    threshold: float = 30.0,
    coherence_threshold: float = 50.0,
    ylabel: str = "alignment",
    title: str | None = None,
) -> Path:
    """The paper's quadrant scatter: ``series[name]`` = (coherence, alignment) per answer, thresholds drawn.

    Answers in the lower right (alignment ≤ ``threshold``, coherence > ``coherence_threshold``) are
    the misaligned ones counted in the EM rate; the shaded area marks them. Answers without two
    numeric scores are left out and counted in the legend.
    """
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.axvspan(coherence_threshold, 100, ymin=0, ymax=(threshold + 2) / 104, color="tab:red", alpha=0.08, lw=0)
    ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1)
    ax.axvline(coherence_threshold, color="grey", linestyle="--", linewidth=1)
    for name, scores in series.items():
        pts = np.array([(c, a) for c, a in scores if _numeric(c) and _numeric(a)], dtype=float).reshape(-1, 2)
        n_bad = int(((pts[:, 1] <= threshold) & (pts[:, 0] > coherence_threshold)).sum()) if len(pts) else 0
        excluded = len(scores) - len(pts)
        label = f"{name}: {n_bad}/{len(pts)} misaligned" + (f", {excluded} unscored" if excluded else "")
        ax.scatter(pts[:, 0], pts[:, 1], s=14, alpha=0.6, label=label, color=colour_of(name))
    ax.set(
        xlim=(-2, 102),
        ylim=(-2, 102),
        xlabel="coherence (0-100, judge)",
        ylabel=f"{ylabel} (0-100, judge)",
        title=title or f"{ylabel} vs coherence (misaligned: ≤ {threshold:g} and coherence > {coherence_threshold:g})",
    )
    ax.title.set_fontsize(9)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def _numeric(score: object) -> bool:
    return isinstance(score, (int, float)) and not isinstance(score, bool) and bool(np.isfinite(score))


def plot_per_question(
    per_question: Mapping[str, tuple[float, float, float, int]], path: str | Path, label: str = "EM", title: str | None = None
) -> Path:
    """``per_question[q] = (rate, lo, hi, n_scored)``: bars with 95% Wilson intervals; questions without scores show no bar."""
    names = list(per_question)
    rates = np.array([per_question[q][0] for q in names], dtype=float)
    lo = np.array([per_question[q][1] for q in names], dtype=float)
    hi = np.array([per_question[q][2] for q in names], dtype=float)
    err = np.nan_to_num(np.vstack([rates - lo, hi - rates]))
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.45 * len(names)))
    ys = np.arange(len(names))
    ax.barh(ys, np.nan_to_num(rates), xerr=err, capsize=3, color="tab:red", alpha=0.7)
    for y, q in enumerate(names):
        ax.text(0.99, y, f"n={per_question[q][3]}", va="center", ha="right", fontsize=7, transform=ax.get_yaxis_transform())
    ax.set_yticks(ys, [textwrap.shorten(q, 48, placeholder="…") for q in names], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel=f"{label} rate (share of scored answers, 95% Wilson CI)", title=title or f"{label} rate per question")
    return save_figure(fig, path)
