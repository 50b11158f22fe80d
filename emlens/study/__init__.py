"""The paper's whole study as one resumable run: ``run_study(config, out)`` (CLI: ``emlens reproduce``).

Stages (:mod:`emlens.study.stages`) train the general and narrow solutions of each kind, continue
the narrow run without KL, sweep the KL weight, train the mixing baseline, measure efficiency,
stability and pre-training KL (:mod:`emlens.study.measures`), the judge-free preference table
and, with a judge, the EM rates; each is cached on disk under a key of everything it depends on.
:mod:`emlens.study.report` writes one report with every figure and a JSON of every number.
"""

from __future__ import annotations

import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from emlens.study.config import PAPER_CONFIG, StudyConfig
from emlens.study.stages import (
    Context,
    Stage,
    StageOutput,
    StaleStageWarning,
    absent_reason,
    build_stages,
    identity_of,
    read_finished,
    run_stage,
    stage_dir,
    stage_key,
    stale_reason,
)

__all__ = ["PAPER_CONFIG", "NothingToReport", "StaleStageWarning", "StudyConfig", "StudyRun", "run_study", "rewrite_report"]


class NothingToReport(ValueError):
    """``--report-only`` found no stage finished under the config's keys: nothing is written (an existing report stays)."""


class StudyRun:
    """What :func:`run_study` did: every stage's output, which ran and which were cached, and the report.

    ``stale`` names each finished stage that ran again because an upstream stage's saved output changed, and why.
    """

    def __init__(self, outputs: dict[str, StageOutput], report: Path, model_loaded: bool, stale: dict[str, str] | None = None):
        self.outputs = outputs
        self.report = report
        self.model_loaded = model_loaded
        self.stale = stale or {}

    @property
    def ran(self) -> list[str]:
        return [name for name, o in self.outputs.items() if not o.cached]

    @property
    def cached(self) -> list[str]:
        return [name for name, o in self.outputs.items() if o.cached]


UPSTREAM = "upstream"  # a reason's kind: an upstream stage's output changed, or is not reusable now


@dataclass
class _Stored:
    """What ``out`` holds for a config's stages: each stage's key, and whether it can be reused.

    ``reusable``: finished under its key from the upstream outputs stored now. ``waiting``: finished under its key,
    but an upstream stage must run first (checked again once it has). ``reasons``: for every other stage, its
    kind (:func:`~emlens.study.stages.absent_reason`'s, or ``"upstream"``) and why, in the stages' order.
    """

    keys: dict[str, str] = field(default_factory=dict)
    reusable: dict[str, StageOutput] = field(default_factory=dict)
    waiting: dict[str, StageOutput] = field(default_factory=dict)
    reasons: dict[str, tuple[str, str]] = field(default_factory=dict)


def _stored_stages(stages: list[Stage], identity: dict[str, Any], out: Path) -> _Stored:
    """Every stage's key (from its settings, the identity and its upstream keys) and what ``out`` holds of it.

    A stage finished under its key is reusable only while every upstream stage is and still holds the output the
    stage read (:func:`~emlens.study.stages.stale_reason`): keys name settings, not the weights a run saved.
    """
    stored = _Stored()
    for stage in stages:
        key = stored.keys[stage.name] = stage_key(stage, identity, [stored.keys[d] for d in stage.deps])
        directory = stage_dir(out, stage.name)
        finished = read_finished(directory, key)
        if finished is None:
            stored.reasons[stage.name] = absent_reason(directory, key)
            continue
        pending = [d for d in stage.deps if d not in stored.reusable]
        if pending:
            stored.waiting[stage.name] = finished
            stored.reasons[stage.name] = (UPSTREAM, f"its upstream stage {pending[0]} is not reusable ({stored.reasons[pending[0]][1]})")
            continue
        reason = stale_reason(stage, finished, stored.reusable)
        if reason is None:
            stored.reusable[stage.name] = finished
        else:
            stored.reasons[stage.name] = (UPSTREAM, reason)
    return stored


def run_study(config: StudyConfig, out: str | Path, progress: bool = True, command: str | None = None, context: Any = None) -> StudyRun:
    """Run (or resume) every stage of ``config`` in ``out`` and write the report there.

    A stage whose key is unchanged and that finished is not run again, unless an upstream stage's saved output is
    no longer the one it read (then it runs again, with a :class:`StaleStageWarning` saying why); an interrupted one
    continues (training from its last checkpoint). ``context`` replaces the lazily loaded model and data (tests pass one).
    """
    from emlens.study.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    identity = identity_of(config)
    ctx = context or Context(config, out, progress, revision=identity["model"].get("revision"))
    stages = build_stages(config)
    stored = _stored_stages(stages, identity, out)
    outputs = dict(stored.reusable)
    todo = [stage for stage in stages if stage.name not in outputs]
    ctx.check_mixing([float(s.settings.get("mix_ratio", 0.0)) for s in todo])  # a bad ratio stops the study before any work
    stale: dict[str, str] = {}
    # the whole study's bar: the stage running, stages done, and the time left (each stage shows its own bar below)
    bar = tqdm(total=len(todo), desc="study", unit="stage", disable=not progress or not todo, dynamic_ncols=True)
    for stage in todo:
        upstream = {d: outputs[d] for d in stage.deps}
        kind, reason = stored.reasons[stage.name]
        waiting = stored.waiting.get(stage.name)
        if waiting is not None:  # its upstream ran first: reusable if that saved the output this stage read
            again = stale_reason(stage, waiting, upstream)
            if again is None:
                outputs[stage.name] = waiting
                bar.total -= 1
                continue
            kind, reason = UPSTREAM, again
        if kind == UPSTREAM:
            stale[stage.name] = reason
            warnings.warn(f"{stage.name} runs again: {reason}", StaleStageWarning, stacklevel=2)
        bar.set_description(f"study [{len(outputs) + 1}/{len(stages)}] {stage.name}", refresh=True)
        outputs[stage.name] = run_stage(ctx, stage, stored.keys[stage.name], upstream)
        if bar.n + 1 < bar.total:
            bar.update(1)
        else:
            bar.n = bar.total  # drawn once, by close()
    bar.close()
    ordered = {s.name: outputs[s.name] for s in stages}
    text = command or "emlens reproduce " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    report = write_report(config, ordered, identity, out, text, time.perf_counter() - start)
    return StudyRun(ordered, report, ctx.model_loaded, stale)


def rewrite_report(config: StudyConfig, out: str | Path, command: str | None = None) -> Path:
    """Write the report again from the finished stages in ``out`` (no model, nothing recomputed).

    Only stages stored under the key ``config`` gives them now, from the upstream outputs stored now, are
    reported: a stage run with other settings (or other data, model or emlens version, or other upstream
    stages), one not found, and one whose upstream stage's output is missing or changed since it ran are
    left out, each named in a warning, so the report never pairs a config with numbers it did not make.
    Raises :class:`NothingToReport`, writing nothing, when no stage is left (an existing report stays).
    """
    from emlens.study.report import write_report

    start = time.perf_counter()
    out = Path(out)
    identity = identity_of(config)
    stages = build_stages(config)
    stored = _stored_stages(stages, identity, out)
    outputs = {s.name: stored.reusable[s.name] for s in stages if s.name in stored.reusable}
    groups: dict[str, list[str]] = {"other": [], "not found": [], UPSTREAM: []}
    for name, (kind, reason) in stored.reasons.items():
        if kind == UPSTREAM:
            groups[UPSTREAM].append(f"{name} ({reason})")
        else:
            groups["not found" if kind == "not found" else "other"].append(name)
    if not outputs:
        raise NothingToReport(
            f"no stage in {out / 'stages'} finished under this config's settings ({len(stages)} expected: "
            f"{len(groups['not found'])} not found, {len(groups['other'])} stored under other settings or unfinished, "
            f"{len(groups[UPSTREAM])} with a changed upstream); nothing was written"
            + (" and the existing report is kept" if (out / "report.json").exists() or (out / "report.md").exists() else "")
            + ". Run `emlens reproduce` with this config (or pass the config the stages were run with)."
        )
    rerun = " (run `emlens reproduce` with this config to compute them)"
    why = {
        "other": ("in {out} were not finished under this config's settings", ", "),
        "not found": ("of this config are not in {out}/stages", ", "),
        UPSTREAM: ("in {out} were computed from upstream outputs that are missing or have changed since,", "; "),
    }
    for group, (said, sep) in why.items():
        if groups[group]:
            warnings.warn(
                f"{len(groups[group])} stage(s) {said.format(out=out)} and are left out of the report: {sep.join(groups[group])}{rerun}",
                stacklevel=2,
            )
    left_out = list(stored.reasons)
    identity = {
        **identity,
        "note": "report rewritten from stored stages",
        "left_out": left_out,
        "left_out_reasons": {name: reason for name, (_, reason) in stored.reasons.items()},
    }
    return write_report(config, outputs, identity, out, command or "emlens reproduce --report-only", time.perf_counter() - start)
