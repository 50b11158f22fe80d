"""``emlens reproduce``: the paper's whole study in one resumable command, for either case study."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from emlens.data.studies import STUDIES
from emlens.models import DTYPES


def register(add: Any) -> None:
    p = add(
        "reproduce",
        reproduce_command,
        help="run the paper's whole study (training, drift, KL sweep, mixing, every metric, report), cached and resumable",
        description="Runs every stage of the study in --config (default: the paper's settings, shipped as "
        "emlens/study/paper.toml), each cached in OUT/stages under a key of everything it depends on: a re-run with the "
        "same settings does nothing, a changed setting re-runs the stages whose key holds it (and those reading them), and an interrupted run "
        "continues from its checkpoints. Writes OUT/report.md with figures in OUT/figures and OUT/report.json with every number.",
    )
    p.add_argument("--config", default=None, help="study config (TOML); default: the paper's settings")
    p.add_argument("--study", choices=list(STUDIES), default=None, help="case study (overrides the config's `study`)")
    p.add_argument("--model", default=None, help="model (overrides the config's [model] name)")
    p.add_argument("--device", default=None, help="device (overrides the config's [model] device)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weights and activations (overrides the config's [model] dtype, float32)"
    )
    p.add_argument(
        "--judge-url", default=None, help="OpenAI-compatible judge URL ('local': the model judges itself); adds the judged evaluation"
    )
    p.add_argument("--judge-model", default=None, help="judge model name; adds the judged evaluation")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and stop")
    p.add_argument(
        "--report-only", action="store_true", help="write the report again from the stages finished in --out (no model, nothing run)"
    )
    p.add_argument("--out", required=True, help="output directory (a re-run in it resumes and reuses finished stages)")


def reproduce_command(args: argparse.Namespace) -> int:
    import json

    from emlens.study import StudyConfig, run_study
    from emlens.validation import check_out_dir

    flags = {"study": args.study, "model.name": args.model, "model.device": args.device, "model.dtype": args.dtype}
    flags |= {"evaluation.judge_url": args.judge_url, "evaluation.judge_model": args.judge_model}
    config = StudyConfig.load(args.config, {key: value for key, value in flags.items() if value})
    if args.print_config:
        print(json.dumps(config.as_dict(), indent=2))
        return 0
    out = check_out_dir(args.out, "the stages, the report and its figures")
    if args.report_only:
        from emlens.study import rewrite_report

        print(f"report: {rewrite_report(config, out)}")
        return 0
    from emlens.judge import JudgeError
    from emlens.study.stages import IncompleteEvaluation

    try:
        run = run_study(config, Path(out))
    except (JudgeError, IncompleteEvaluation) as err:  # as `emlens evaluate`: one line, exit code 3, the work so far kept
        from emlens.cli import judge_failed

        return judge_failed(args, err, f"every finished stage is kept in {out}/stages; run the same command again to continue")
    print(f"{len(run.ran)} stage(s) ran, {len(run.cached)} reused from {out}/stages; report: {run.report} (numbers: {out}/report.json)")
    return 0
