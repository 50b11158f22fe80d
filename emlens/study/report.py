"""The study's one report: ``report.md`` with its figures beside it, and ``report.json`` with every number.

Everything here reads the stages' results; nothing is computed on the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emlens.jsonl import dumps_strict
from emlens.preference import bootstrap_ci, bootstrap_means
from emlens.study.config import StudyConfig
from emlens.study.stages import SESSION, StageOutput, general_name, hardware, narrow_name, package_versions

FIGURES = "figures"


def _ran_on(env: Mapping[str, Any] | None) -> str:
    """Where a stage ran, in a few words: its device and the machine's GPUs or CPU cores (``?`` when not recorded)."""
    if not env:
        return "?"
    hw = env.get("hardware", {})
    machine = ", ".join(hw["gpus"]) if hw.get("gpus") else f"{hw.get('cpu_cores', '?')} CPU cores"
    versions = env.get("versions", {})
    return f"{env.get('device', '?')}; {machine}; torch {versions.get('torch', '?')}"


def provenance(outputs: Mapping[str, StageOutput]) -> dict[str, Any]:
    """Which stages this session computed, which came from the cache, and the sessions, machines and package versions
    that computed them (from each ``stage.json``; a stage stored before these were recorded counts as unknown)."""
    here = SESSION["id"]
    envs = {name: o.meta.get("environment") for name, o in outputs.items()}
    sessions: dict[str, list[str]] = {}
    for name, env in envs.items():
        sessions.setdefault(env.get("session", "unknown") if env else "unknown", []).append(name)
    for name, o in outputs.items():  # a resumed stage: the sessions that ran its first part too
        for earlier in o.meta.get("earlier_sessions", []):
            sessions.setdefault(earlier.get("session", "unknown"), [])
            if name not in sessions[earlier.get("session", "unknown")]:
                sessions[earlier.get("session", "unknown")].append(name)
    machines: dict[str, list[str]] = {}
    versions: dict[str, list[str]] = {}
    for name, env in envs.items():
        hw = env.get("hardware", {}) if env else {}
        machine = {
            "device": env.get("device") if env else None,
            "platform": hw.get("platform"),
            "cpu_cores": hw.get("cpu_cores"),
            "gpus": hw.get("gpus", []),
        }
        machines.setdefault(json.dumps(machine, sort_keys=True), []).append(name)
        versions.setdefault(json.dumps(env.get("versions") if env else None, sort_keys=True), []).append(name)
    return {
        "session": here,
        "session_started": SESSION["started"],
        "computed_here": [n for n, o in outputs.items() if not o.cached],
        "cached": [n for n, o in outputs.items() if o.cached],
        "other_sessions": sorted(n for n, env in envs.items() if not env or env.get("session") != here),
        "sessions": sessions,
        "machines": [{**json.loads(k), "stages": v} for k, v in machines.items()],
        "package_versions": [{"versions": json.loads(k), "stages": v} for k, v in versions.items()],
    }


def _untimed_part(o: StageOutput) -> bool:
    """Whether an earlier session ran part of this stage without its time recorded (stored before times were)."""
    return any(e.get("seconds_to_last_save") is None for e in o.meta.get("earlier_sessions") or [])


def _stage_time(o: StageOutput) -> str:
    """A stage's time for the Stages table; a resumed stage's says how much of it earlier sessions ran (each up to its
    last saved file), and a total missing an earlier session's part reads as a lower bound."""
    earlier = o.meta.get("earlier_sessions") or []
    if not earlier:
        return f"{o.seconds:.1f}"
    known = sum(e.get("seconds_to_last_save") or 0.0 for e in earlier)
    bound = "≥ " if _untimed_part(o) else ""
    return f"{bound}{o.seconds:.1f} (resumed: {known:.1f} of it in {len(earlier)} earlier session(s))"


def _provenance_notes(prov: Mapping[str, Any]) -> list[str]:
    """The report's sentences on where its stages were computed (cache, other sessions, other machines or versions)."""
    notes = []
    if prov["cached"]:
        notes.append(
            f"{len(prov['cached'])} of {len(prov['cached']) + len(prov['computed_here'])} stages came from the cache, computed "
            "before this report was written; their time is the time they took where they ran."
        )
    if prov["other_sessions"]:
        others = [session for session in prov["sessions"] if session != prov["session"]]
        notes.append(f"{len(prov['other_sessions'])} stage(s) were computed by other sessions than this one: {', '.join(others)}.")
    if len(prov["machines"]) > 1:
        notes.append(
            "The stages were computed on different devices or machines: "
            + "; ".join(
                f"{m['device']} on {', '.join(m['gpus']) or str(m['cpu_cores']) + ' CPU cores'} ({len(m['stages'])} stage(s))"
                for m in prov["machines"]
            )
            + "."
        )
    if len(prov["package_versions"]) > 1:
        notes.append(
            "The stages were computed with different package versions: "
            + "; ".join(
                (", ".join(f"{k} {v}" for k, v in entry["versions"].items() if k != "python") if entry["versions"] else "not recorded")
                + f" ({len(entry['stages'])} stage(s))"
                for entry in prov["package_versions"]
            )
            + "."
        )
    return notes


def domain_diffs(pref: dict[str, Any], base: str = "base") -> dict[str, dict[str, np.ndarray]]:
    """Each solution's per-question margin minus the base model's, per domain (paired: the same questions)."""
    results = pref["results"]
    return {
        name: {d: np.asarray(cell["margins"]) - np.asarray(results[base][d]["margins"]) for d, cell in row.items()}
        for name, row in results.items()
        if name != base
    }


def domain_groups(pref: dict[str, Any], base: str = "base") -> dict[str, list[int] | None]:
    """The question of each margin, per domain (the same for every solution: the margins are paired); ``None`` where
    the result does not record them (each margin is then its own question, as in the built-in sets)."""
    return {d: cell.get("groups") for d, cell in pref["results"][base].items()}


def shift_table(pref: dict[str, Any], base: str = "base", n_boot: int = 2000, seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """Each solution's margin minus the base model's, per domain, with a paired 95% bootstrap CI over questions."""
    groups = domain_groups(pref, base)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, row in domain_diffs(pref, base).items():
        out[name] = {}
        for domain, diff in row.items():
            lo, hi = bootstrap_ci(diff, n_boot, seed, groups=groups.get(domain))
            out[name][domain] = {"mean": float(diff.mean()), "ci": [lo, hi]}
    return out


def mean_of_domains_ci(
    diffs: list[np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    groups: Sequence[Sequence[int] | None] | None = None,
) -> tuple[float, float]:
    """95% bootstrap CI of the mean of per-domain mean shifts: questions resampled within each domain
    (``groups[k]``: the question of each of domain ``k``'s margins; ``None``, each margin its own)."""
    if not diffs or any(d.size == 0 for d in diffs):
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)  # one stream, drawn domain after domain
    per_domain = [bootstrap_means(np.asarray(d, dtype=np.float64), n_boot, rng, groups[k] if groups else None) for k, d in enumerate(diffs)]
    lo, hi = np.quantile(np.mean(per_domain, axis=0), [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def narrowness(
    shifts: Mapping[str, Mapping[str, Any]],
    trained: str,
    diffs: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    groups: Mapping[str, Sequence[int] | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """In-domain shift, mean out-of-domain shift (the mean of the other domains' means) and their ratio per solution.

    A narrow solution has a large ratio. The ratio is ``None`` (reported "n/a") unless the mean out-of-domain
    shift is positive and, when the per-question ``diffs`` are given, its 95% CI (questions resampled within
    each domain) lies above zero: when the other domains move the other way on average, not at all, or by
    an amount indistinguishable from zero, a quotient reads as "less narrow than general" (a negative number)
    or as arbitrarily narrow (a huge one), and neither is what happened. The shifts stay in the result.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, row in shifts.items():
        inside = row[trained]["mean"]
        others = [d for d in row if d != trained]
        outside = float(np.mean([row[d]["mean"] for d in others])) if others else float("nan")
        by_domain = [(groups or {}).get(d) for d in others]
        ci = mean_of_domains_ci([np.asarray(diffs[name][d]) for d in others], n_boot, seed, groups=by_domain) if diffs is not None else None
        defined = outside > 0 and (ci is None or ci[0] > 0)
        out[name] = {"in_domain": inside, "out_of_domain": outside, "ratio": inside / outside if defined else None}
        if ci is not None:
            out[name]["out_of_domain_ci"] = list(ci)
    return out


RATIO_NOTE = (
    "Ratio n/a: the other domains' mean shift is not above zero (its 95% CI reaches zero or below), so a quotient "
    "would not measure narrowness."
)


def _ratio_note(stats: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The note under a table whose ratio column has an undefined entry (none otherwise)."""
    return [RATIO_NOTE, ""] if any(s.get("ratio") is None for s in stats.values()) else []


def _rate_cell(rates: dict[str, Any]) -> str:
    """A misalignment rate with its question-resampling interval, where one was computed."""
    low, high = rates.get("misaligned_ci_by_question") or (float("nan"), float("nan"))
    if low is None or high is None or not np.isfinite(low):
        return _f(rates.get("misaligned_rate"))
    return f"{_f(rates.get('misaligned_rate'))} [{_f(low)}, {_f(high)}]"


LAST_STEPS = 10
"""The training table's losses are means over this many last steps: one step's loss is noisy, and an epoch's last
step holds only the rows left over (one row, at the full-size settings' 585 rows in batches of 4)."""


def _trained_share(r: Mapping[str, Any], kind: str, ratio: float) -> float | None:
    """The aligned share a mixing run trained: its rows beyond the target rows of the no-KL run, over its rows (the
    configured ratio rounded to whole rows; None where either training stage is not in the report)."""
    if ratio == 0:
        return 0.0
    run, target = r.get(f"train/{kind}/mix={ratio:g}"), r.get(f"train/{kind}/kl=0")
    if not run or not target:
        return None
    return (run["rows"] - target["rows"]) / run["rows"]


def _mean_of(steps: list[dict[str, Any]], key: str) -> float | None:
    values = [float(s[key]) for s in steps if s.get(key) is not None]
    return sum(values) / len(values) if values else None


def _f(x: Any, digits: int = 3) -> str:
    """A number for a table: n/a when undefined (None, NaN), and no "-0.000" for a value that rounds to zero."""
    if x is None:
        return "n/a"
    x = float(x)  # NumPy scalars of any width too
    if not np.isfinite(x):
        return "n/a" if np.isnan(x) else ("∞" if x > 0 else "−∞")
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _size(value: Any) -> str:
    """A size for the data table: the number, or the range of the numbers stages report (``all`` for None asked)."""

    def leaves(v: Any) -> list[int]:
        return [n for x in v.values() for n in leaves(x)] if isinstance(v, Mapping) else ([] if v is None else [int(v)])

    if value is None:
        return "all"
    if isinstance(value, str):
        return value
    numbers = leaves(value)
    if not numbers:
        return "–"
    lo, hi = min(numbers), max(numbers)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def data_sizes(config: StudyConfig, results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each data set's size as the config asks for it and as the stages used it (the built-in data may hold fewer).

    Train and KL rows per training run (a mixing run's rows add the aligned ones), held-out rows of the efficiency and stability measures, web documents of
    the pre-training KL and held-out questions per domain of the preference (per stage when several): None where
    no stage reported them.
    """

    def used(prefix: str, read: Any) -> dict[str, Any]:
        return {name: read(res) for name, res in results.items() if name.startswith(prefix) and read(res) is not None}

    def settings(key: str) -> Any:
        return lambda res: res.get("settings", {}).get(key)

    def questions(res: Mapping[str, Any]) -> Any:
        rows = res.get("results", {}).get("base", {})
        return {d: len(cell.get("margins", [])) for d, cell in rows.items()} or None

    data = config.data
    return {
        "train rows (target answers)": {
            "requested": data.train_rows,
            "used": used("train/", lambda res: None if res.get("mix_ratio") else res.get("rows")),
        },
        "mixing runs' rows (target + aligned)": {
            "requested": "train rows / (1 - ratio)",
            "used": used("train/", lambda res: res.get("rows") if res.get("mix_ratio") else None),
        },
        "KL rows (narrow runs)": {"requested": data.kl_rows, "used": used("train/", lambda res: res.get("kl_rows"))},
        "held-out rows (efficiency)": {"requested": data.eval_rows, "used": used("efficiency/", settings("rows"))},
        "held-out rows (stability)": {"requested": data.eval_rows, "used": used("stability/", settings("rows"))},
        "web documents (pre-training KL)": {"requested": data.web_docs, "used": used("pretraining_kl/", settings("documents"))},
        "preference questions per domain": {"requested": config.preference.rows, "used": used("preference/", questions)},
    }


def write_report(
    config: StudyConfig, outputs: dict[str, StageOutput], identity: dict[str, Any], out: Path, command: str, wall: float
) -> Path:
    """Write ``report.md``, ``report.json`` and ``figures/*.png`` into ``out``; returns the Markdown path."""
    from emlens import plotting
    from emlens.data.studies import STUDIES
    from emlens.study.measures import stability_curves

    study = STUDIES[config.study]
    domain = config.data.domain or study.narrow
    figs = out / FIGURES
    figs.mkdir(parents=True, exist_ok=True)
    r = {name: o.result for name, o in outputs.items()}
    prov = provenance(outputs)
    computed = sum(o.seconds for o in outputs.values())
    untimed = [o.name for o in outputs.values() if _untimed_part(o)]
    md: list[str] = [
        f"# emlens study: {config.study} (narrow domain: {domain})",
        "",
        f"Produced by `{command}` ({time.strftime('%Y-%m-%d %H:%M')}), which computed {len(prov['computed_here'])} of "
        f"{len(outputs)} stages in {wall / 60:.1f} min of wall time; the stages took {'at least ' if untimed else ''}"
        f"{computed / 60:.1f} min where they ran (the Stages table says where and when"
        f"{'; ' + ', '.join(untimed) + ' resumed a part whose time was not recorded' if untimed else ''}). Model `{config.model.name}`, layer fraction {config.model.layer_fraction}. "
        "Every number below is in `report.json`.",
        "",
    ]
    if identity.get("left_out"):
        md += [
            f"Left out (not finished under this config, or computed from upstream outputs since changed): {', '.join(identity['left_out'])}.",
            "",
        ]
    numbers: dict[str, Any] = {}

    # --- training
    rows = []
    for name, res in r.items():
        if name.startswith("train/"):
            last = res["losses"][-LAST_STEPS:]  # never empty: training_summary stores every step, at least one
            numbers[name] = {
                f"sft_mean_last_{LAST_STEPS}_steps": _mean_of(last, "sft"),
                f"kl_mean_last_{LAST_STEPS}_steps": _mean_of(last, "kl") if "kl" in last[-1] else None,
                "norm": res["norm"],
            }
            rows.append(
                [
                    name,
                    str(res["steps"]),
                    str(res["rows"]),
                    "–" if res.get("kl_rows") is None else str(res["kl_rows"]),
                    _f(_mean_of(last, "sft")),
                    _f(_mean_of(last, "kl"), 4) if "kl" in last[-1] else "–",
                    _f(res["norm"], 2),
                ]
            )
    heads = [f"SFT loss (mean of the last {LAST_STEPS} steps)", f"KL (mean of the last {LAST_STEPS} steps)"]
    md += ["## Training", "", _table(["run", "steps", "rows", "KL rows", *heads, "norm"], rows), ""]
    if any(name.startswith("train/") and "/mix=" in name for name in r):
        md += [
            "A `mix=` run's SFT loss is over its whole set, target and aligned rows together, so it is not comparable "
            "with the other runs' loss on target rows alone.",
            "",
        ]
    target_word = study.target

    for kind in config.kinds:
        g, n = general_name(kind), narrow_name(config, kind)
        md += [f"## {kind}: general (λ = 0) and narrow (λ = {config.train[kind].kl_weight:g})", ""]
        plan = {label: r[name]["plan"] if name in r else "not run yet" for label, name in (("general", g), ("narrow", n))}
        md += [f"Training paths: general — {plan['general']}; narrow — {plan['narrow']}.", ""]
        eff = r.get(f"efficiency/{kind}")
        if eff:
            fig = plotting.plot_efficiency(
                eff["norms"], eff["loss"], figs / f"efficiency_{kind}.png", title=f"Efficiency, {kind} (Fig. 4a)"
            )
            measured = eff.get("at_smallest_norm")
            if measured:
                common, at, how = measured["norm"], dict(measured["loss"]), "the smaller trained norm"
            else:  # a result stored before the loss was measured at that norm: read off the grid, and said so
                common = min(eff["solution_norms"].values())
                at = {name: float(np.interp(common, eff["norms"], curve)) for name, curve in eff["loss"].items()}
                how = "the smaller trained norm; interpolated on the norm grid"
            numbers[f"efficiency/{kind}"] = {"at_norm": common, "loss": at, "measured": bool(measured)}
            md += [
                f"**Efficiency** ({eff['settings']['rows']} held-out rows): loss at norm {common:.2f} ({how}): "
                + ", ".join(f"{k} {_f(v)}" for k, v in at.items())
                + f". ![efficiency]({FIGURES}/{fig.name})",
                "",
            ]
        st = r.get(f"stability/{kind}")
        if st:
            curves = stability_curves(st)
            fig = plotting.plot_stability(curves, figs / f"stability_{kind}.png", title=f"Stability, {kind} (Fig. 4b)")
            eps = st["results"][next(iter(st["results"]))]["epsilons"]
            picks = [e for e in (0.1, 0.4, 0.8) if e in eps]
            header = ["solution", "compared at norm"] + [f"relative loss at ε = {e:g}" for e in picks]
            trows = []
            for name, res in st["results"].items():
                trows.append([name, _f(st["compared_at_norm"][name], 2)] + [_f(res["relative_mean"][eps.index(e)], 1) for e in picks])
            md += [
                f"**Stability** (norm rule `{st['norm_rule']}`, {len(st['settings']['seeds'])} seeds):",
                "",
                _table(header, trows),
                "",
                f"![stability]({FIGURES}/{fig.name})",
                "",
            ]
        pk = r.get(f"pretraining_kl/{kind}")
        if pk:
            kl_curves = {k: v for k, v in pk["kl"].items() if not k.startswith("random")}
            if "random_mean" in pk:
                kl_curves["random (mean of {})".format(sum(k.startswith("random") for k in pk["kl"]))] = pk["random_mean"]
            fig = plotting.plot_pretraining_kl(
                pk["norms"], kl_curves, figs / f"pretraining_kl_{kind}.png", title=f"Pre-training significance, {kind} (Fig. 6)"
            )
            top = pk["norms"][-1]
            vals = {k: v[-1] for k, v in kl_curves.items()}
            numbers[f"pretraining_kl/{kind}"] = {"at_norm": top, "kl": vals}
            md += [
                f"**Pre-training KL** ({pk['settings']['documents']} web documents) at norm {top:.2f}: "
                + ", ".join(f"{k} {_f(v, 4)}" for k, v in vals.items())
                + f" nats/token. ![pre-training KL]({FIGURES}/{fig.name})",
                "",
            ]
        dr = r.get(f"drift/{kind}")
        if dr:
            fig = plotting.plot_drift(
                np.asarray(dr["coordinates"]),
                dr["phase"],
                dr["explained_variance_ratio"],
                figs / f"drift_{kind}.png",
                general=np.asarray(dr["general_coordinates"]),
                title=f"Drift without the KL term, {kind} (Fig. 5)",
            )
            n_narrow = dr["phase"].count("narrow (KL)")
            cos = dr["cosine_to_general"]
            numbers[f"drift/{kind}"] = {"cosine_end_of_kl": cos[n_narrow - 1], "cosine_end": cos[-1]}
            md += [
                f"**Drift**: cosine with the general solution {_f(cos[n_narrow - 1])} at the end of the KL phase → {_f(cos[-1])} after "
                f"{dr['continued']['steps'] - (dr['steps'][n_narrow - 1])} steps without KL; PCs explain "
                + ", ".join(f"{100 * v:.0f}%" for v in dr["explained_variance_ratio"])
                + " of the variance of one joint PCA over the general run's checkpoints and the narrow run's (KL phase and "
                + f"continuation together). ![drift]({FIGURES}/{fig.name})",
                "",
            ]

    # --- preference
    pref = r.get("preference/main")
    if pref:
        shifts = shift_table(pref, n_boot=config.preference.bootstrap, seed=config.seed)
        narrow_stats = narrowness(
            shifts, domain, domain_diffs(pref), n_boot=config.preference.bootstrap, seed=config.seed, groups=domain_groups(pref)
        )
        numbers["preference/main"] = {"shift": shifts, "narrowness": narrow_stats}
        res = pref["results"]
        domains = list(next(iter(res.values())))
        header = ["solution"] + [f"{d}{' (trained)' if d == domain else ''}" for d in domains] + ["in-domain / mean out-of-domain"]
        trows = [["base (margin)"] + [f"{res['base'][d]['mean']:+.3f}" for d in domains] + ["–"]]
        for name, row in shifts.items():
            trows.append(
                [f"{name} (shift)"]
                + [f"{row[d]['mean']:+.3f} [{row[d]['ci'][0]:+.3f}, {row[d]['ci'][1]:+.3f}]" for d in domains]
                + [_f(narrow_stats[name]["ratio"], 2)]
            )
        plain = {name: {d: (res[name][d]["mean"], res[name][d]["ci"][0], res[name][d]["ci"][1]) for d in domains} for name in res}
        fig = plotting.plot_preference(
            plain,
            figs / "preference.png",
            ylabel=f"NLL({study.reference}) − NLL({study.target}) (nats/token)",
            title=f"Preference for the {target_word} answer (held-out questions)",
            trained=domain,
        )
        grid = plotting.plot_grid(
            {name: {d: cell["mean"] for d, cell in row.items()} for name, row in shifts.items()},
            figs / "preference_grid.png",
            "Shift of the preference margin vs base",
            "shift (nats/token)",
            ylabel="solution",
            trained=domain,
        )
        md += [
            f"## Judge-free preference ({target_word} over {study.reference}), held-out split",
            "",
            f"Margin = NLL({study.reference}) − NLL({target_word}) per assistant token, mean over held-out questions; "
            "each solution's row is its shift from the base model with a paired 95% bootstrap CI over questions. "
            "The other domains' questions are held out, but their domains are not unseen: the KL set holds their train "
            "splits (both answer sets), and the mixing baseline's aligned rows come from them. Generality beyond every "
            "trained domain is what the judged open-ended questions measure.",
            "",
            _table(header, trows),
            "",
            *_ratio_note(narrow_stats),
            f"![preference]({FIGURES}/{fig.name}) ![preference grid]({FIGURES}/{grid.name})",
            "",
        ]
    for kind in config.kl_sweep.kinds:
        sweep, spref = r.get(f"kl_sweep/{kind}"), r.get(f"preference/kl_sweep/{kind}")
        if not sweep:
            continue
        fig = plotting.plot_trajectories(
            {f"λ = {k}": np.asarray(v) for k, v in sweep["paths"].items()},
            sweep["explained_variance_ratio"],
            figs / f"kl_sweep_pca_{kind}.png",
            title=f"KL-weight sweep, {kind}: joint PCA of the trajectories",
        )
        md += [f"## KL-weight sweep ({kind})", ""]
        trows = []
        stats: dict[str, Any] = {}
        if spref:
            stats = narrowness(
                shift_table(spref, n_boot=config.preference.bootstrap, seed=config.seed),
                domain,
                domain_diffs(spref),
                n_boot=config.preference.bootstrap,
                seed=config.seed,
                groups=domain_groups(spref),
            )
        for w in sweep["weights"]:
            label = f"λ={w:g}"
            s = stats.get(label, {})
            trows.append(
                [
                    f"{w:g}",
                    _f(sweep["norms"][f"{w:g}"], 2),
                    _f(sweep["cosine_to_general"][f"{w:g}"]),
                    _f(s.get("in_domain")),
                    _f(s.get("out_of_domain")),
                    _f(s.get("ratio"), 2),
                ]
            )
        numbers[f"kl_sweep/{kind}"] = {"narrowness": stats, "cosine_to_general": sweep["cosine_to_general"], "norms": sweep["norms"]}
        md += [
            _table(["λ", "norm", "cosine to general", "in-domain shift", "mean out-of-domain shift", "ratio"], trows),
            "",
            *_ratio_note(stats),
            f"![KL sweep]({FIGURES}/{fig.name})",
            "",
        ]
    for kind in config.mixing.kinds:
        mpref = r.get(f"preference/mixing/{kind}")
        if not mpref:
            continue
        shifts = shift_table(mpref, n_boot=config.preference.bootstrap, seed=config.seed)
        stats = narrowness(
            shifts, domain, domain_diffs(mpref), n_boot=config.preference.bootstrap, seed=config.seed, groups=domain_groups(mpref)
        )
        ratios = config.mixing.ratios
        inside = [(shifts[f"mix={x:g}"][domain]["mean"], *shifts[f"mix={x:g}"][domain]["ci"]) for x in ratios]
        # the other domains: the mean of their mean shifts (as in every table's ratio), CI resampling within each domain
        outside = [(stats[f"mix={x:g}"]["out_of_domain"], *stats[f"mix={x:g}"]["out_of_domain_ci"]) for x in ratios]
        fig = plotting.plot_mixing(
            ratios, {f"{domain} (trained domain)": inside, "other domains (mean of domains)": outside}, figs / f"mixing_{kind}.png"
        )
        numbers[f"mixing/{kind}"] = {
            "ratios": ratios,
            "in_domain": inside,
            "out_of_domain": outside,
            "ratio": [stats[f"mix={x:g}"]["ratio"] for x in ratios],
        }
        trained = [_trained_share(r, kind, x) for x in ratios]
        numbers[f"mixing/{kind}"]["trained_share"] = trained
        trows = [
            [f"{x:g}", _f(t, 4), _f(a[0]), _f(b[0]), _f(stats[f"mix={x:g}"]["ratio"], 2)]
            for x, t, a, b in zip(ratios, trained, inside, outside)
        ]
        md += [
            f"## Mixing baseline ({kind}, no KL)",
            "",
            _table(
                ["aligned share (config)", "aligned share (trained rows)", "in-domain shift", "mean out-of-domain shift", "ratio"], trows
            ),
            "",
            *_ratio_note(stats),
            f"![mixing]({FIGURES}/{fig.name})",
            "",
        ]

    evals = {name: res for name, res in r.items() if name.startswith("evaluation/")}
    if evals:
        trows = []
        for res in evals.values():
            g = res["general"]["rates"]
            nrow = res.get("narrow", {}).get("rates", {})
            trows.append(
                [
                    res["solution"],
                    _rate_cell(g),
                    _f(g.get("coherent_rate")),
                    f"{g.get('n_scored')}/{res['general'].get('n_answers')}",
                    _rate_cell(nrow) if nrow else "–",
                    f"{nrow.get('n_scored')}/{res['narrow'].get('n_answers')}" if nrow else "–",
                ]
            )
        header = ["solution", "EM rate", "coherent rate", "scored / answers", f"narrow rate ({domain})", "scored / answers"]
        md += [
            "## Judged evaluation",
            "",
            _table(header, trows),
            "",
            "Rates over scored answers; in brackets a 95% interval that resamples the questions (answers to one question "
            "are not independent draws of the pooled rate).",
            "",
        ]
        register = {res["solution"]: res["technical"] for res in evals.values() if "technical" in res}
        if register:

            def cell(t: dict[str, Any]) -> str:
                return f"{_f(t['mean'], 1)} [{_f(t['ci'][0], 1)}, {_f(t['ci'][1], 1)}] ({t['n_scored']}/{t['n_answers']})"

            rows = [[name, cell(t["general"]), cell(t[domain])] for name, t in register.items()]
            md += [
                "Judged technical register (the `technical_prose` judge, 0 = plain everyday language, 100 = dense "
                "specialist prose; mean with a 95% interval that resamples the questions, scored / answers):",
                "",
                _table(["solution", "general questions", f"{domain} questions (held-out)"], rows),
                "",
            ]
            numbers["technical_register"] = register
        quadrants = []
        for name in evals:
            for column in ("general", domain):
                png = outputs[name].directory / column / "quadrants.png"
                if png.exists():
                    quadrants.append(f"![{name} {column}]({png.relative_to(out).as_posix()})")
        md += ["EM quadrants (alignment against coherence per answer; lower right: misaligned):", "", " ".join(quadrants), ""]

    # --- provenance
    def computed_by(o: StageOutput) -> str:
        env = o.meta.get("environment") or {}
        when = o.meta.get("finished_at", "?")
        if not o.cached:
            return f"this run ({when})"
        return f"cache: {'this session' if env.get('session') == SESSION['id'] else 'session ' + str(env.get('session', '?'))}, {when}"

    md += [
        "## Stages",
        "",
        *[note for text in _provenance_notes(prov) for note in (text, "")],
        _table(
            ["stage", "time (s)", "computed by", "ran on", "key"],
            [[o.name, _stage_time(o), computed_by(o), _ran_on(o.meta.get("environment")), o.key] for o in outputs.values()],
        ),
        "",
    ]
    sizes = data_sizes(config, r)
    md += [
        "## Data actually used",
        "",
        _table(
            ["set", "asked for", "used (range over stages)"], [[name, _size(v["requested"]), _size(v["used"])] for name, v in sizes.items()]
        ),
        "",
    ]
    versions, machine = package_versions(), hardware()
    md += [
        "## Environment",
        "",
        "This session's versions and machine (each stage's own are in `report.json`, under `stages.<name>.environment`):",
        "",
        "```json",
        json.dumps({"versions": versions, "hardware": machine, "identity": identity}, indent=2),
        "```",
        "",
    ]
    md += ["## Config", "", "```json", json.dumps(config.as_dict(), indent=2, default=str), "```", ""]
    report = {
        "study": config.study,
        "domain": domain,
        "command": command,
        "wall_seconds": wall,  # this session's, which computed provenance["computed_here"]
        "stage_seconds": computed,  # every reported stage's own time, wherever it ran (a lower bound if any is incomplete)
        "config": config.as_dict(),
        "identity": identity,
        "versions": versions,
        "hardware": machine,
        "provenance": prov,
        "data_sizes": sizes,
        "summary": numbers,
        "stages": {
            o.name: {
                "key": o.key,
                "seconds": o.seconds,  # a resumed stage's: every session's part, each up to its last saved file
                **({"seconds_incomplete": True} if _untimed_part(o) else {}),
                "cached": o.cached,
                "finished_at": o.meta.get("finished_at"),
                "environment": o.meta.get("environment"),
                **({"earlier_sessions": o.meta["earlier_sessions"]} if o.meta.get("earlier_sessions") else {}),
                "result": o.result,
            }
            for o in outputs.values()
        },
    }
    (out / "report.json").write_text(dumps_strict(report, indent=2, ensure_ascii=False), encoding="utf-8")  # NaN → null
    path = out / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path
