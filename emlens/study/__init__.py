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
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from emlens.study.config import PAPER_CONFIG, StudyConfig
from emlens.study.stages import (
    STAGE_FILE,
    Context,
    Stage,
    StageOutput,
    build_stages,
    identity_of,
    read_finished,
    run_stage,
    stage_dir,
    stage_key,
)

__all__ = ["PAPER_CONFIG", "StudyConfig", "StudyRun", "run_study", "rewrite_report"]


class StudyRun:
    """What :func:`run_study` did: every stage's output, which ran and which were cached, and the report."""

    def __init__(self, outputs: dict[str, StageOutput], report: Path, model_loaded: bool):
        self.outputs = outputs
        self.report = report
        self.model_loaded = model_loaded

    @property
    def ran(self) -> list[str]:
        return [name for name, o in self.outputs.items() if not o.cached]

    @property
    def cached(self) -> list[str]:
        return [name for name, o in self.outputs.items() if o.cached]


def _stored_stages(stages: list[Stage], identity: dict[str, Any], out: Path) -> tuple[dict[str, str], dict[str, StageOutput], list[Stage]]:
    """Every stage's key (from its settings, the identity and its upstream keys), the stages stored finished under
    that key in ``out``, and the others, in order."""
    keys: dict[str, str] = {}
    outputs: dict[str, StageOutput] = {}
    missing: list[Stage] = []
    for stage in stages:
        keys[stage.name] = stage_key(stage, identity, [keys[d] for d in stage.deps])
        finished = read_finished(stage_dir(out, stage.name), keys[stage.name])
        if finished is not None:
            outputs[stage.name] = finished
        else:
            missing.append(stage)
    return keys, outputs, missing


def run_study(config: StudyConfig, out: str | Path, progress: bool = True, command: str | None = None, context: Any = None) -> StudyRun:
    """Run (or resume) every stage of ``config`` in ``out`` and write the report there.

    A stage whose key is unchanged and that finished is not run again; an interrupted one
    continues (training from its last checkpoint). ``context`` replaces the lazily loaded model
    and data (tests pass one).
    """
    from emlens.study.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    identity = identity_of(config)
    ctx = context or Context(config, out, progress, revision=identity["model"].get("revision"))
    stages = build_stages(config)
    keys, outputs, todo = _stored_stages(stages, identity, out)
    ctx.check_mixing([float(s.settings.get("mix_ratio", 0.0)) for s in todo])  # a bad ratio stops the study before any work
    # the whole study's bar: the stage running, stages done, and the time left (each stage shows its own bar below)
    bar = tqdm(total=len(todo), desc="study", unit="stage", disable=not progress or not todo, dynamic_ncols=True)
    for k, stage in enumerate(todo):
        bar.set_description(f"study [{len(outputs) + 1}/{len(stages)}] {stage.name}", refresh=True)
        upstream = {d: outputs[d] for d in stage.deps}
        outputs[stage.name] = run_stage(ctx, stage, keys[stage.name], upstream)
        if k + 1 < len(todo):
            bar.update(1)
        else:
            bar.n = len(todo)  # drawn once, by close()
    bar.close()
    ordered = {s.name: outputs[s.name] for s in stages}
    text = command or "emlens reproduce " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    report = write_report(config, ordered, identity, out, text, time.perf_counter() - start)
    return StudyRun(ordered, report, ctx.model_loaded)


def rewrite_report(config: StudyConfig, out: str | Path, command: str | None = None) -> Path:
    """Write the report again from the finished stages in ``out`` (no model, nothing recomputed).

    Only stages stored under the key ``config`` gives them now are reported: a stage run with other
    settings (or other data, model or emlens version, or other upstream stages) is left out with a
    warning, as are stages not found, so the report never pairs a config with numbers it did not make.
    """
    import warnings

    from emlens.study.report import write_report

    out = Path(out)
    identity = identity_of(config)
    _, outputs, missing = _stored_stages(build_stages(config), identity, out)
    stale = [stage.name for stage in missing if (stage_dir(out, stage.name) / STAGE_FILE).exists()]  # stored, other key
    if stale:
        warnings.warn(
            f"{len(stale)} stage(s) in {out} were not finished under this config's settings and are left out of the report: "
            + ", ".join(stale)
            + " (run `emlens reproduce` with this config to compute them)",
            stacklevel=2,
        )
    identity = {**identity, "note": "report rewritten from stored stages", "left_out": stale}
    wall = float(sum(o.seconds for o in outputs.values()))
    return write_report(config, outputs, identity, out, command or "emlens reproduce --report-only", wall)
