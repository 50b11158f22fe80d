"""``emlens evaluate`` and ``emlens grid``: sample answers with a solution on, and judge them (the study's evaluation stage, by hand)."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emlens.cli.flags import (
    EXIT_JUDGE_FAILED,
    add_allow_other_model,
    add_model_flags,
    check_out_dir,
    load_interventions,
    load_model_of,
    named_specs,
    nonnegative_float,
    open_unit_interval,
    positive_int,
    seed_value,
)
from emlens.data.studies import MISALIGNMENT
from emlens.models import cache_dir
from emlens.validation import ConfigError

EVAL_DOMAINS = MISALIGNMENT.domains
DEFAULT_JUDGE_MODEL = "gpt-4o-2024-08-06"
LOCAL_JUDGE_WARNING = (
    "--local-judge: the evaluated model judges its own answers. A small model cannot tell answers apart this way "
    "(SmolLM2-135M gives a helpful, a harmful and a gibberish answer the same alignment, ≈ 32/100), so these rates are "
    "not EM rates; use a capable judge (--judge-url/--judge-model) or the judge-free `emlens preference`"
)


def _evaluate_default(name: str) -> Any:
    from emlens.evaluation import evaluate

    return inspect.signature(evaluate).parameters[name].default


def n_samples_value(text: str) -> int:
    """``--n-samples``: an integer >= 1 (:func:`emlens.judge.check_n_samples`)."""
    from emlens.judge import check_n_samples

    try:
        return check_n_samples(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--n-samples", type=n_samples_value, default=_evaluate_default("n_samples"), help="answers per question (paper: 50 or more)"
    )
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=_evaluate_default("max_new_tokens"), help="tokens per answer at most (paper: 600)"
    )
    p.add_argument(
        "--temperature",
        type=nonnegative_float,
        default=_evaluate_default("temperature"),
        help="sampling temperature, 0 = greedy (paper: 1)",
    )
    p.add_argument(
        "--top-p", type=open_unit_interval, default=_evaluate_default("top_p"), help="nucleus sampling mass in (0, 1] (paper: 1)"
    )
    p.add_argument("--batch-size", type=positive_int, default=None, help="sampling batch size (default: sized from free GPU memory)")
    p.add_argument("--seed", type=seed_value, default=_evaluate_default("seed"), help="sampling seed")


def _add_judge_flags(p: argparse.ArgumentParser, default_model: str | None) -> None:
    p.add_argument(
        "--judge-url",
        default=None,
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL or the OpenAI API)",
    )
    p.add_argument("--judge-model", default=default_model, help=f"judge model name (default: {default_model or DEFAULT_JUDGE_MODEL})")
    p.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
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
        default="error",
        help="a judge reply whose multi-token number cannot be scored exactly: stop (error) or leave it unscored (none)",
    )
    p.add_argument(
        "--judge-cache",
        default=str(cache_dir() / "judge_cache.jsonl"),
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
    add_model_flags(ev)
    ev.add_argument("--intervention", default=None, help=".safetensors solution (omit for the base model)")
    ev.add_argument(
        "--domain", choices=list(EVAL_DOMAINS), default=None, help="ask in-domain questions and judge correctness (narrow misalignment)"
    )
    _add_sampling_flags(ev)
    _add_judge_flags(ev, default_model=DEFAULT_JUDGE_MODEL)
    ev.add_argument("--sample-only", action="store_true", help="only sample the answers into OUT/answers.jsonl; no judge is needed")
    add_allow_other_model(ev)
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
    add_model_flags(gr)
    gr.add_argument("--domains", nargs="+", choices=list(EVAL_DOMAINS), default=list(EVAL_DOMAINS), help="evaluation domains")
    gr.add_argument("--limit", type=positive_int, default=None, help="held-out pairs per domain for the preference grid (default: all)")
    gr.add_argument("--bootstrap", type=positive_int, default=2000, help="bootstrap resamples for the preference CIs")
    gr.add_argument("--no-general", action="store_true", help="judged grid: leave out the EM column on the general questions")
    _add_sampling_flags(gr)
    _add_judge_flags(gr, default_model=None)
    add_allow_other_model(gr)
    gr.add_argument("--out", required=True, help="output directory")


def _judge_prompts(args: argparse.Namespace, domains: Sequence[str | None]) -> Any:
    """The judge prompts, checked before any model loads: the file parses and has every judge needed."""
    from emlens.judge import default_judge_prompts, load_judge_prompts

    prompts = load_judge_prompts(args.judge_prompts) if args.judge_prompts else default_judge_prompts()
    for d in domains:
        name = prompts.domain_judge(d)
        if name not in prompts:
            raise ConfigError(f"--judge-prompts {prompts.source} has no {name!r} prompt (it has: {', '.join(prompts.names())})")
    return prompts


def _api_judge(args: argparse.Namespace) -> Any:
    """The OpenAI-compatible judge of the flags (a missing API key is a mistake in the input)."""
    from emlens.judge import JudgeError, OpenAIJudge

    try:
        return OpenAIJudge(
            args.judge_model or DEFAULT_JUDGE_MODEL,
            base_url=args.judge_url,
            api_key_env=args.judge_api_key_env or None,
            cache_path=args.judge_cache or None,
            on_ambiguous=args.judge_ambiguous,
        )
    except JudgeError as err:
        raise ConfigError(
            f"{err} (--judge-api-key-env). Without a judge: --local-judge (an offline approximation), --sample-only "
            "(sample now, judge later), or the judge-free `emlens preference`"
        ) from None


def _sampling_options(args: argparse.Namespace, prompts: Any) -> dict[str, Any]:
    """The sampling and judging settings that `evaluate` and the judged `grid` share, from their flags."""
    return dict(
        n_samples=args.n_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
        prompts=prompts,
        model_name=str(args.model),
    )


def _judge_failed(err: BaseException, args: argparse.Namespace, out: Path, cache: str | None) -> int:
    """Exit 3 after a judge failure, saying where each piece of the work so far really is."""
    from emlens.cli import one_line
    from emlens.evaluation import ANSWERS_FILE, JUDGED_FILE

    if args.debug:
        traceback.print_exc()
    print(f"emlens: error: {one_line(err)}", file=sys.stderr)

    def count(name: str) -> list[Path]:
        return sorted(out.rglob(name)) if out.exists() else []

    answers, judged = count(ANSWERS_FILE), count(JUDGED_FILE)
    n_answers = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in answers)
    n_judged = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in judged)
    parts = [f"{n_answers} sampled answer(s) in {', '.join(map(str, answers)) or out}"]
    parts.append(
        f"{n_judged} judged answer(s) in {', '.join(map(str, judged))}" if judged else f"no answer fully judged yet (so no {JUDGED_FILE})"
    )
    parts.append(f"every judge reply so far in the cache {Path(cache).expanduser()}" if cache else "no judge cache (--judge-cache '')")
    print(
        f"emlens: nothing is lost: {'; '.join(parts)}; re-run the same command to continue (nothing done is asked again)", file=sys.stderr
    )
    return EXIT_JUDGE_FAILED


def _close(judge: Any) -> None:
    close = getattr(judge, "close", None)
    if callable(close):
        close()


def evaluate_command(args: argparse.Namespace) -> int:
    from emlens.evaluation import evaluate, sample_only
    from emlens.interventions import Intervention
    from emlens.judge import JudgeError, LocalModelJudge

    out = check_out_dir(args.out)
    if args.sample_only:
        intervention = Intervention.load(args.intervention, device=args.device) if args.intervention else None
        model = load_model_of(args)
        answers = sample_only(
            model,
            out,
            intervention,
            args.domain,
            None,
            args.n_samples,
            args.max_new_tokens,
            args.temperature,
            args.top_p,
            args.batch_size,
            args.seed,
            model_name=str(args.model),
            overwrite=args.overwrite,
        )
        n = len(answers.read_text(encoding="utf-8").splitlines())
        print(f"sampled {n} answers into {answers}; judge them later with the same command without --sample-only")
        return 0
    prompts = _judge_prompts(args, [args.domain])
    intervention = Intervention.load(args.intervention, device=args.device) if args.intervention else None
    judge = None if args.local_judge else _api_judge(args)
    model = load_model_of(args)
    if judge is None:
        warnings.warn(LOCAL_JUDGE_WARNING, UserWarning, stacklevel=1)
        judge = LocalModelJudge(model)
    try:
        result = evaluate(model, judge, out, intervention, args.domain, overwrite=args.overwrite, **_sampling_options(args, prompts))
    except JudgeError as err:
        return _judge_failed(err, args, out, None if args.local_judge else args.judge_cache)
    finally:
        _close(judge)
    if result.rates.n_scored == 0:
        warnings.warn(
            f"the judge scored none of the {result.n_answers} answers, so the rates are undefined; the answers are "
            f"kept in {out}; check the judge (--judge-url, --judge-model, API key) or use more --n-samples",
            UserWarning,
            stacklevel=1,
        )
    elif result.n_pending:
        warnings.warn(
            f"{result.n_pending} answer(s) got no usable judge reply; re-run the same command to judge them", UserWarning, stacklevel=1
        )
    print(result.summary() + (" [local judge: not an EM rate, see the warning above]" if args.local_judge else ""))
    for question, rates in result.per_question.items():
        print(f"  {rates.misaligned_rate:6.3f}  (n={rates.n_scored:3d})  {question}")
    print(f"wrote {out}/results.json, quadrants.png and per_question.png")
    return 0


def grid_command(args: argparse.Namespace) -> int:
    from emlens.evaluation import judged_grid
    from emlens.judge import JudgeError, LocalModelJudge
    from emlens.plotting import plot_rate_grid
    from emlens.preference import BASE, format_table, plot_preference_grid, preference_grid, table_as_dict

    out = check_out_dir(args.out)
    judged = bool(args.judge_url or args.judge_model or args.local_judge)
    general = not args.no_general
    paths = named_specs(args.solutions)
    for name in paths:
        if name == BASE:
            raise ConfigError(
                f"the name {BASE!r} is reserved for the base model, which is always a row; name each solution by its training domain"
            )
        if name not in EVAL_DOMAINS:
            raise ConfigError(
                f"{name!r} is not a training domain: name each solution DOMAIN=PATH with DOMAIN one of {', '.join(EVAL_DOMAINS)}"
            )
    prompts = _judge_prompts(args, [*args.domains, *([None] if general else [])]) if judged else None
    solutions = load_interventions(paths, args.device)
    judge = _api_judge(args) if judged and not args.local_judge else None
    model = load_model_of(args)
    grid = preference_grid(
        model, solutions, args.domains, limit=args.limit, batch_size=args.batch_size or 8, n_boot=args.bootstrap, seed=args.seed
    )
    print(
        "preference margin = NLL(correct) − NLL(harmful) per assistant token; rows: evaluation domains, columns: solutions (by training domain)"
    )
    print(format_table(grid))
    plot_preference_grid(grid, out / "preference_grid.png")
    (out / "preference_grid.json").write_text(
        json.dumps({"model": args.model, "limit": args.limit, "results": table_as_dict(grid)}, indent=2)
    )
    print(f"wrote {out}/preference_grid.png and preference_grid.json")
    if not judged:
        return 0
    if judge is None:
        warnings.warn(LOCAL_JUDGE_WARNING, UserWarning, stacklevel=1)
        judge = LocalModelJudge(model)
    named: dict[str, Any] = {BASE: None, **solutions}
    try:
        cells = judged_grid(model, named, judge, out, args.domains, general=general, **_sampling_options(args, prompts))
    except JudgeError as err:
        return _judge_failed(err, args, out, None if args.local_judge else args.judge_cache)
    finally:
        _close(judge)
    rates = {row: {col: r.rates.misaligned_rate for col, r in cols.items()} for row, cols in cells.items()}
    plot_rate_grid(
        rates,
        out / "judged_grid.png",
        title="Judged misalignment: narrow rate per domain" + (", EM rate on general questions" if general else ""),
    )
    (out / "grid.json").write_text(
        json.dumps({row: {col: r.as_dict() for col, r in cols.items()} for row, cols in cells.items()}, indent=2, ensure_ascii=False)
    )
    cols = list(next(iter(rates.values())))
    print("| solution | " + " | ".join(cols) + " |\n| --- |" + " ---: |" * len(cols))
    for row, values in rates.items():
        print(f"| {row} | " + " | ".join(f"{values[c]:.3f}" for c in cols) + " |")
    print(f"wrote {out}/judged_grid.png and grid.json")
    return 0
