"""``emlens evaluate`` and ``emlens grid``: sample answers with a solution on, and judge them (the study's evaluation stage, by hand)."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any

from emlens.cli import flags
from emlens.data.studies import MISALIGNMENT
from emlens.evaluation import evaluate
from emlens.judge import DEFAULT_JUDGE_MODEL, OpenAIJudge, default_cache_path
from emlens.study.config import PreferenceSection
from emlens.validation import ConfigError, check_out_dir, named_paths

EVAL_DOMAINS = MISALIGNMENT.domains
LOCAL_JUDGE_WARNING = (
    "--local-judge: the evaluated model judges its own answers. A small model cannot tell answers apart this way "
    "(SmolLM2-135M gives a helpful, a harmful and a gibberish answer the same alignment, ≈ 32/100), so these rates are "
    "not EM rates; use a capable judge (--judge-url/--judge-model) or the judge-free `emlens preference`"
)


SAMPLING_FLAGS: flags.Flags = {  # the parameters of emlens.evaluation.evaluate they set
    "--n-samples": ("n_samples", flags.positive_int, "answers per question (paper: 50 or more)"),
    "--max-new-tokens": ("max_new_tokens", flags.positive_int, "tokens per answer at most (paper: 600)"),
    "--temperature": ("temperature", flags.nonnegative_float, "sampling temperature, 0 = greedy (paper: 1)"),
    "--top-p": ("top_p", flags.open_unit_interval, "nucleus sampling mass in (0, 1] (paper: 1)"),
    "--batch-size": ("batch_size", flags.positive_int, "sampling batch size (default: sized from free GPU memory)"),
    "--seed": ("seed", flags.seed_value, "sampling seed"),
}


def _add_judge_flags(p: argparse.ArgumentParser) -> None:
    flags.add_flags(p, evaluate, SAMPLING_FLAGS)
    p.add_argument(
        "--judge-url",
        default=None,
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL or the OpenAI API)",
    )
    p.add_argument("--judge-model", default=None, help=f"judge model name (default: {DEFAULT_JUDGE_MODEL})")
    p.add_argument(
        "--judge-api-key-env",
        default=flags.default_of(OpenAIJudge, "api_key_env"),
        metavar="NAME",
        help="environment variable holding the judge's API key (a local server may need none)",
    )
    p.add_argument(
        "--judge-prompts",
        default=None,
        metavar="PATH.yaml",
        help="judge prompts in the shape of the paper's judges.yaml (keys aligned, coherent, <domain>_correct)",
    )
    p.add_argument(
        "--judge-ambiguous",
        choices=["error", "none"],
        default=flags.default_of(OpenAIJudge, "on_ambiguous"),
        help="a judge reply whose multi-token number cannot be scored exactly: stop (error) or leave it unscored (none)",
    )
    p.add_argument(
        "--judge-cache",
        default=str(default_cache_path()),
        metavar="PATH",
        help="on-disk cache of judge replies ('' for none; its folder follows $EMLENS_CACHE, then $XDG_CACHE_HOME)",
    )
    p.add_argument(
        "--local-judge",
        action="store_true",
        help="offline approximation only: the evaluated model judges itself (see the warning it prints)",
    )


def register(add: Any) -> None:
    ev = add(
        "evaluate",
        evaluate_command,
        help="sample answers with a solution on and judge them: EM / narrow rates, per question, quadrant plot",
        description="Sample answers to OUT/answers.jsonl, judge them into OUT/judged.jsonl (both resumable: re-run the same "
        "command after an interruption or a judge failure), then write OUT/results.json, OUT/quadrants.png and "
        "OUT/per_question.png. --sample-only stops after sampling (judge later, or elsewhere). See docs/evaluation.md.",
    )
    flags.add_model_flags(ev)
    ev.add_argument("--intervention", default=None, help=".safetensors solution (omit for the base model)")
    ev.add_argument(
        "--domain", choices=list(EVAL_DOMAINS), default=None, help="ask in-domain questions and judge correctness (narrow misalignment)"
    )
    _add_judge_flags(ev)
    ev.add_argument("--sample-only", action="store_true", help="only sample the answers into OUT/answers.jsonl; no judge is needed")
    flags.add_allow_other_model(ev)
    ev.add_argument("--overwrite", action="store_true", help="start again in --out, deleting its answers and judgements")
    ev.add_argument("--out", required=True, help="output directory (created; a re-run with the same settings continues)")

    gr = add(
        "grid",
        grid_command,
        help="solution x evaluation-domain grid: preference margins offline, judged rates with a judge",
        description="Rows: the base model and one solution per training domain (DOMAIN=PATH, DOMAIN = the domain it was "
        "trained on, one of " + ", ".join(EVAL_DOMAINS) + "); columns: evaluation domains. Always writes the judge-free "
        "preference grid (OUT/preference_grid.png/.json); with --judge-url, --judge-model or --local-judge also the judged "
        "narrow-misalignment rate per domain and the EM rate on the general questions (OUT/judged_grid.png, OUT/grid.json; "
        "each cell is a resumable evaluate run in OUT/ROW/COLUMN).",
    )
    gr.add_argument("solutions", nargs="+", help="TRAIN_DOMAIN=PATH.safetensors for each solution")
    flags.add_model_flags(gr)
    gr.add_argument("--domains", nargs="+", choices=list(EVAL_DOMAINS), default=list(EVAL_DOMAINS), help="evaluation domains")
    gr.add_argument(
        "--limit", type=flags.positive_int, default=None, help="held-out pairs per domain for the preference grid (default: all)"
    )
    flags.add_flags(gr, PreferenceSection, {"--bootstrap": ("bootstrap", flags.positive_int, "bootstrap resamples for the preference CIs")})
    gr.add_argument("--no-general", action="store_true", help="judged grid: leave out the EM column on the general questions")
    _add_judge_flags(gr)
    flags.add_allow_other_model(gr)
    gr.add_argument("--out", required=True, help="output directory")


def _api_judge(args: argparse.Namespace) -> Any:
    """The OpenAI-compatible judge of the flags (a missing API key is a mistake in the input)."""
    from emlens.evaluation import make_judge
    from emlens.judge import JudgeError

    try:
        options = dict(api_key_env=args.judge_api_key_env, cache_path=args.judge_cache or None, on_ambiguous=args.judge_ambiguous)
        return make_judge(args.judge_url, args.judge_model, **options)
    except JudgeError as err:
        raise ConfigError(
            f"{err} (--judge-api-key-env). Without a judge: --local-judge (an offline approximation), --sample-only "
            "(sample now, judge later), or the judge-free `emlens preference`"
        ) from None


def _prepare(args: argparse.Namespace, domains: list[str | None]) -> tuple[Any, dict[str, Any]]:
    """Before any model loads: the API judge (``None`` for --local-judge) and evaluate's settings, prompts checked."""
    from emlens.evaluation import check_judge_prompts

    if args.judge_url == "local":  # as `emlens reproduce --judge-url local` reads it: the evaluated model judges
        args.local_judge = True
    prompts = check_judge_prompts(args.judge_prompts, domains)
    settings = dict(flags.values_of(args, SAMPLING_FLAGS), prompts=prompts, model_name=str(args.model))
    return (None if args.local_judge else _api_judge(args)), settings


def _judging(args: argparse.Namespace, judge: Any, model: Any, run: Callable[[Any], Any]) -> Any:
    """``run(judge)``, or exit code 3 after a judge failure, saying where the work so far is kept."""
    from emlens.cli import judge_failed
    from emlens.evaluation import judge_failure_report, make_judge
    from emlens.judge import JudgeError

    if judge is None:
        warnings.warn(LOCAL_JUDGE_WARNING, UserWarning, stacklevel=1)
        judge = make_judge("local", evaluated=model)
    try:
        return run(judge)
    except JudgeError as err:
        return judge_failed(args, err, judge_failure_report(args.out, None if args.local_judge else args.judge_cache))
    finally:
        getattr(judge, "close", lambda: None)()


def evaluate_command(args: argparse.Namespace) -> int:
    from emlens.evaluation import EvaluationResult, sample_only

    out = check_out_dir(args.out)
    if args.sample_only:
        intervention = flags.load_optional(args.intervention, args.device)
        sampling = flags.values_of(args, SAMPLING_FLAGS)
        model = flags.load_model_of(args)
        answers = sample_only(model, out, intervention, args.domain, model_name=str(args.model), overwrite=args.overwrite, **sampling)
        n = len(answers.read_text(encoding="utf-8").splitlines())
        print(f"sampled {n} answers into {answers}; judge them later with the same command without --sample-only")
        return 0
    judge, settings = _prepare(args, [args.domain])
    intervention = flags.load_optional(args.intervention, args.device)
    model = flags.load_model_of(args)
    result = _judging(
        args, judge, model, lambda j: evaluate(model, j, out, intervention, args.domain, overwrite=args.overwrite, **settings)
    )
    if not isinstance(result, EvaluationResult):
        return result
    if result.problem():
        warnings.warn(str(result.problem()), UserWarning, stacklevel=1)
    print(result.summary() + (" [local judge: not an EM rate, see the warning above]" if args.local_judge else ""))
    print("\n".join(result.per_question_lines()))
    print(f"wrote {out}/results.json, quadrants.png and per_question.png")
    return 0


def grid_command(args: argparse.Namespace) -> int:
    from emlens.evaluation import grid_problems, judged_grid, write_judged_grid
    from emlens.preference import BASE, check_grid_rows, format_table, preference_grid, write_preference_grid

    out = check_out_dir(args.out)
    judged = bool(args.judge_url or args.judge_model or args.local_judge)
    general = not args.no_general
    paths = named_paths(args.solutions)
    check_grid_rows(paths)
    judge, settings = _prepare(args, [*args.domains, *([None] if general else [])]) if judged else (None, {})
    solutions = flags.load_interventions(paths, args.device)
    model = flags.load_model_of(args)
    grid = preference_grid(
        model,
        solutions,
        args.domains,
        limit=args.limit,
        batch_size=args.batch_size or flags.default_of(PreferenceSection, "batch_size"),
        n_boot=args.bootstrap,
        seed=args.seed,
    )
    print(
        "preference margin = NLL(correct) − NLL(harmful) per assistant token; rows: evaluation domains, columns: solutions (by training domain)"
    )
    print(format_table(grid))
    from emlens.runner import runner_for

    write_preference_grid(  # the shape every measure command writes: measure, settings, results, plans
        grid,
        out,
        measure="preference_grid",
        settings={"domains": list(args.domains), "limit": args.limit, "bootstrap": args.bootstrap, "seed": args.seed, "split": "heldout"},
        margin="NLL(correct) - NLL(harmful), mean per assistant token; rows: solutions by training domain, columns: evaluation domains",
        ci="95% percentile bootstrap over questions",
        plans={name: runner_for(model).plan(sol).describe() for name, sol in {BASE: None, **solutions}.items()},
        model=str(args.model),
    )
    print(f"wrote {out}/preference_grid.png and preference_grid.json")
    if not judged:
        return 0
    named: dict[str, Any] = {BASE: None, **solutions}
    cells = _judging(args, judge, model, lambda j: judged_grid(model, named, j, out, args.domains, general=general, **settings))
    if isinstance(cells, int):
        return cells
    for line in grid_problems(cells):  # per cell, as evaluate says it: a rate with answers still to judge is not final
        warnings.warn(line, UserWarning, stacklevel=1)
    print(write_judged_grid(cells, out, general))
    print(f"wrote {out}/judged_grid.png and grid.json")
    return 0
