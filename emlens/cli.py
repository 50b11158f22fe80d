"""Command line: ``emlens train ...`` trains a steering vector or rank-1 adapter and saves the run.

Every flag is checked where it enters. A mistake in the input (a bad flag value, a
missing or malformed data file, an output that would clobber a run) ends with a
one-line ``emlens: error: ...`` on stderr and exit code 2; ``--debug`` also prints
the traceback. Other failures (CUDA errors, out of memory, bugs) are not dressed up
as input mistakes: they raise with their traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from emlens.models import ModelLoadError, check_device
from emlens.validation import (
    ConfigError,
    check_float,
    check_int,
    check_seed,
    validate_train_config,
)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command line that argparse rejected (unknown flag, bad value, missing argument)."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports mistakes as one line instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# --- flag types: parse the text, then check it with emlens.validation -------------


def _flag_type(parse: Callable[[str], Any], check: Callable[..., Any], **bounds: Any) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = text  # not even a number: the check below says what is expected
        try:
            return check("value", value, **bounds)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(f"must be {err.requirement}, got {text!r}") from None

    convert.__name__ = getattr(check, "__name__", "value")
    return convert


positive_int = _flag_type(int, check_int, minimum=1)
nonnegative_int = _flag_type(int, check_int, minimum=0)
at_least_two = _flag_type(int, check_int, minimum=2)
seed_value = _flag_type(int, check_seed)
positive_float = _flag_type(float, check_float, minimum=0, exclusive_min=True)
nonnegative_float = _flag_type(float, check_float, minimum=0)
finite_float = _flag_type(float, check_float)
unit_interval = _flag_type(float, check_float, minimum=0, maximum=1)


def device_name(text: str) -> str:
    """A device this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    try:
        check_device(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the full traceback when a command fails",
    )


def _add_allow_other_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-other-model",
        action="store_true",
        help="no warning when a saved intervention was trained on a model of another name (same shapes)",
    )


EVAL_DOMAINS = ("medical", "financial", "sports")
DEFAULT_JUDGE_MODEL = "gpt-4o-2024-08-06"
EXIT_JUDGE_FAILED = 3


def n_samples_value(text: str) -> int:
    """``--n-samples``: an integer >= 1 (:func:`emlens.judge.check_n_samples`)."""
    from emlens.judge import check_n_samples

    try:
        return check_n_samples(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-samples", type=n_samples_value, default=50, help="answers per question (paper: 50 or more)")
    p.add_argument("--max-new-tokens", type=positive_int, default=600, help="paper: 600")
    p.add_argument("--temperature", type=nonnegative_float, default=1.0, help="sampling temperature, 0 = greedy (paper: 1)")
    p.add_argument("--top-p", type=_flag_type(float, check_float, minimum=0, exclusive_min=True, maximum=1), default=1.0)
    p.add_argument("--batch-size", type=positive_int, default=None, help="sampling batch size (default: sized from free GPU memory)")
    p.add_argument("--seed", type=seed_value, default=0)


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
        help="environment variable holding the judge's API key (default OPENAI_API_KEY; a local server may need none)",
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
        "--judge-cache", default="~/.cache/emlens/judge_cache.jsonl", metavar="PATH", help="on-disk cache of judge replies ('' for none)"
    )
    p.add_argument("--local-judge", action="store_true", help="offline approximation: the evaluated model judges itself")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="emlens", description=__doc__)
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, **kwargs)
        _add_debug(p, argparse.SUPPRESS)  # `emlens CMD ... --debug` works too
        return p

    t = add("train", help="train a steering vector or rank-1 adapter")
    t.add_argument(
        "--model",
        default="smollm2",
        help="hub name, local checkpoint, .gguf file, or 'smollm2' (default)",
    )
    t.add_argument(
        "--data",
        required=True,
        help="training JSONL or built-in dataset name (e.g. medical_harmful)",
    )
    t.add_argument(
        "--kind",
        choices=["steering", "adapter"],
        default=None,
        help="what to train (default: steering; a resumed run keeps its own)",
    )
    t.add_argument(
        "--layer",
        type=nonnegative_int,
        default=None,
        help="layer L (default: middle layer)",
    )
    t.add_argument(
        "--hook",
        default=None,
        help="steering hook name or shorthand (resid_post (default), mlp_out...)",
    )
    t.add_argument("--alpha", type=finite_float, default=None, help="default 256")
    t.add_argument(
        "--kl-data",
        default=None,
        help="alternative-domain JSONL for the KL term (e.g. alt_domain)",
    )
    t.add_argument(
        "--kl-weight",
        type=nonnegative_float,
        default=0.0,
        help="per-token KL weight λ >= 0 (paper ≈ 6.6 steering, 0.66 LoRA)",
    )
    t.add_argument("--lr", type=positive_float, default=1e-4)
    t.add_argument("--epochs", type=positive_float, default=1.0)
    t.add_argument("--max-steps", type=positive_int, default=None)
    t.add_argument("--batch-size", type=positive_int, default=2)
    t.add_argument("--grad-accum", type=positive_int, default=8)
    t.add_argument("--max-length", type=positive_int, default=256)
    t.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="use only the first N conversations",
    )
    t.add_argument("--checkpoint-every", type=positive_int, default=5)
    t.add_argument("--seed", type=seed_value, default=0)
    t.add_argument("--device", type=device_name, default=DEFAULT_DEVICE)
    t.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    t.add_argument("--resume", default=None, help="directory of an earlier run to continue from")
    t.add_argument("--out", required=True, help="output directory for the run")
    _add_allow_other_model(t)
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="write into --out even if it already holds files",
    )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="smollm2")
        p.add_argument("--device", type=device_name, default=DEFAULT_DEVICE)
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
        p.add_argument("--batch-size", type=positive_int, default=8)
        p.add_argument(
            "--out",
            required=True,
            help="PNG path for the figure (a .json with the numbers is written beside it)",
        )

    def named(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "interventions",
            nargs="+",
            help="NAME=PATH.safetensors (or just PATH) for each solution",
        )
        _add_allow_other_model(p)

    e = add("efficiency", help="loss vs norm of rescaled solutions (Fig. 4a)")
    common(e)
    named(e)
    e.add_argument("--data", required=True)
    e.add_argument(
        "--limit",
        type=positive_int,
        default=100,
        help="rows of the dataset to score (paper: 100)",
    )
    e.add_argument("--points", type=at_least_two, default=11, help="norms, >= 2")
    e.add_argument("--max-factor", type=positive_float, default=2.0)

    st = add("stability", help="loss under norm-preserving orthogonal noise (Fig. 4b)")
    common(st)
    named(st)
    st.add_argument("--data", required=True)
    st.add_argument("--limit", type=positive_int, default=100)
    st.add_argument(
        "--epsilons",
        type=unit_interval,
        nargs="+",
        default=None,
        help="noise strengths in [0, 1]",
    )
    st.add_argument("--seeds", type=positive_int, default=3)
    st.add_argument("--absolute", action="store_true", help="plot raw loss instead of relative loss")

    pk = add(
        "pretraining-kl",
        help="KL from the base model on web text at equal norms (Fig. 6)",
    )
    common(pk)
    named(pk)
    pk.add_argument(
        "--texts",
        default="web_text",
        help=".txt / JSONL of {'text'} documents, or built-in 'web_text'",
    )
    pk.add_argument("--limit", type=positive_int, default=100)
    pk.add_argument(
        "--max-norm",
        type=positive_float,
        default=None,
        help="largest norm (default: largest solution norm)",
    )
    pk.add_argument("--points", type=at_least_two, default=6, help="norms, >= 2")
    pk.add_argument("--random", action="store_true", help="add a random direction for reference")

    dr = add(
        "drift",
        help="narrow run with KL, continued without KL; PCA of checkpoints (Fig. 5)",
    )
    common(dr)
    dr.add_argument("--data", required=True)
    dr.add_argument("--kl-data", default="alt_domain")
    dr.add_argument(
        "--kl-weight",
        type=positive_float,
        default=6.6,
        help="KL weight of the narrow phase (> 0)",
    )
    dr.add_argument("--steps", type=positive_int, default=40, help="steps in each phase")
    dr.add_argument("--lr", type=positive_float, default=5e-4)
    dr.add_argument(
        "--general",
        default=None,
        help="a general solution to compare against (.safetensors)",
    )
    _add_allow_other_model(dr)

    ev = add(
        "evaluate",
        help="sample answers with a solution on and judge them: EM / narrow rates, per question, quadrant plot",
        description="Sample answers to OUT/answers.jsonl, judge them into OUT/judged.jsonl (both resumable: "
        "re-run the same command after an interruption or a judge failure), then write OUT/results.json, "
        "OUT/quadrants.png and OUT/per_question.png. See docs/evaluation.md.",
    )
    ev.add_argument("--model", default="smollm2", help="hub name, local checkpoint, .gguf file, or 'smollm2' (default)")
    ev.add_argument("--device", type=device_name, default=DEFAULT_DEVICE)
    ev.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ev.add_argument(
        "--intervention",
        default=None,
        help=".safetensors solution (omit for the base model)",
    )
    ev.add_argument(
        "--domain",
        choices=list(EVAL_DOMAINS),
        default=None,
        help="ask in-domain questions and judge correctness (narrow misalignment)",
    )
    _add_sampling_flags(ev)
    _add_judge_flags(ev, default_model=DEFAULT_JUDGE_MODEL)
    _add_allow_other_model(ev)
    ev.add_argument("--overwrite", action="store_true", help="start again in --out, deleting its answers and judgements")
    ev.add_argument("--out", required=True, help="output directory (created; a re-run with the same settings continues)")

    gr = add(
        "grid",
        help="train-domain x eval-domain grid: preference margins offline, judged rates with a judge",
        description="Rows: the base model and one solution per training domain (NAME=PATH, NAME = the domain it "
        "was trained on); columns: evaluation domains. Always writes the judge-free preference grid "
        "(OUT/preference_grid.png/.json); with --judge-url, --judge-model or --local-judge also the judged "
        "narrow-misalignment rate per domain and the EM rate on the general questions "
        "(OUT/judged_grid.png, OUT/grid.json; each cell is a resumable evaluate run in OUT/ROW/COLUMN).",
    )
    gr.add_argument("solutions", nargs="+", help="TRAIN_DOMAIN=PATH.safetensors for each solution")
    gr.add_argument("--model", default="smollm2")
    gr.add_argument("--device", type=device_name, default=DEFAULT_DEVICE)
    gr.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    gr.add_argument("--domains", nargs="+", choices=list(EVAL_DOMAINS), default=list(EVAL_DOMAINS), help="evaluation domains")
    gr.add_argument("--limit", type=positive_int, default=60, help="paired rows per domain for the preference grid (default 60)")
    gr.add_argument("--bootstrap", type=positive_int, default=2000, help="bootstrap resamples for the preference CIs")
    gr.add_argument("--no-general", action="store_true", help="judged grid: leave out the EM column on the general questions")
    _add_sampling_flags(gr)
    _add_judge_flags(gr, default_model=None)
    _add_allow_other_model(gr)
    gr.add_argument("--out", required=True, help="output directory")

    from emlens.preference import add_preference_parser

    _add_debug(add_preference_parser(sub), argparse.SUPPRESS)
    return parser


# --- checks that need the file system, done before any model is loaded ------------


def _check_writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: {ancestor} is a file, so the output cannot be created there")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: no permission to write in {ancestor}")


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """An output file path: not a directory, and creatable."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file path")
    _check_writable_parent(path, flag)
    return path


def check_run_dir(out: str | Path, resume: str | Path | None, overwrite: bool) -> Path:
    """The run directory of ``train``: refuse a file, or another run's non-empty directory.

    A non-empty ``out`` is allowed when it is the run being resumed or with ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the run (it is created if missing)")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        resuming_here = resume is not None and Path(resume).resolve() == out.resolve()
        if entries and not (resuming_here or overwrite):
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ConfigError(
                f"--out {out} already holds files ({shown}); choose a new directory, "
                f"pass --resume {out} to continue that run, or --overwrite to write "
                "over it"
            )
    _check_writable_parent(out, "--out")
    return out


def _named_specs(specs: list[str], reserved: tuple[str, ...] = ()) -> dict[str, Path]:
    """``NAME=PATH`` (or ``PATH``) arguments as names to paths; duplicate names are refused."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path_text = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path_text = "", spec
        path = Path(path_text)
        name = name or path.stem
        if not path_text:
            raise ConfigError(f"{spec!r}: no file after '='; use NAME=PATH.safetensors")
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; give an intervention .safetensors file")
        if not path.is_file():
            raise FileNotFoundError(f"no intervention file at {path}")
        if name in out:
            raise ConfigError(f"the name {name!r} is given twice ({out[name]} and {path}); give each solution its own NAME=PATH")
        if name in reserved:
            raise ConfigError(f"the name {name!r} is reserved here (it labels the --random direction); pick another NAME")
        out[name] = path
    return out


def _load_interventions(paths: dict[str, Path], device: str) -> dict[str, Any]:
    from emlens.interventions import Intervention

    return {name: Intervention.load(path, device=device) for name, path in paths.items()}


def _load(args: argparse.Namespace, dtype: torch.dtype | None = None) -> Any:
    from emlens.models import load_model

    return load_model(args.model, device=args.device, dtype=dtype or DTYPES[args.dtype])


def _write_json(png_path: str | Path, data: dict) -> Path:
    import json

    path = Path(png_path).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


# --- subcommands ------------------------------------------------------------------


def cmd_efficiency(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_conversations
    from emlens.metrics import efficiency, norm_grid
    from emlens.plotting import plot_efficiency

    check_output_file(args.out)
    read_conversations(args.data, args.limit)  # refuse bad data before the model loads
    solutions = _load_interventions(_named_specs(args.interventions), args.device)
    model = _load(args)
    data = TokenDataset.from_conversations(model.tokenizer, args.data, limit=args.limit)
    norms = norm_grid(list(solutions.values()), args.points, args.max_factor)
    curves: dict[str, Sequence[float]] = {k: efficiency(model, v, data, norms, args.batch_size) for k, v in solutions.items()}
    print("norm    " + "  ".join(f"{k:>10}" for k in curves))
    for i, n in enumerate(norms):
        print(f"{n:7.2f} " + "  ".join(f"{curves[k][i]:10.4f}" for k in curves))
    plot_efficiency(norms, curves, args.out)
    _write_json(args.out, {"norms": norms, "loss": curves})
    print(f"wrote {args.out}")
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_conversations
    from emlens.metrics import PAPER_EPSILONS, stability
    from emlens.plotting import plot_stability

    check_output_file(args.out)
    read_conversations(args.data, args.limit)
    solutions = _load_interventions(_named_specs(args.interventions), args.device)
    model = _load(args)
    data = TokenDataset.from_conversations(model.tokenizer, args.data, limit=args.limit)
    eps = args.epsilons or list(PAPER_EPSILONS)
    seeds = list(range(args.seeds))
    results = {k: stability(model, v, data, eps, seeds, args.batch_size) for k, v in solutions.items()}
    for k, r in results.items():
        by_eps = ", ".join(f"{e:g}:{m:.1f}" for e, m in zip(r.epsilons, r.relative().mean(0)))
        print(f"{k}: base loss {r.base_loss:.4f}; relative loss by ε: {by_eps}")
    plot_stability(results, args.out, relative=not args.absolute)
    _write_json(
        args.out,
        {
            k: {
                "epsilons": r.epsilons,
                "losses": r.losses.tolist(),
                "base_loss": r.base_loss,
            }
            for k, r in results.items()
        },
    )
    print(f"wrote {args.out}")
    return 0


def cmd_pretraining_kl(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_texts
    from emlens.interventions import random_direction_like
    from emlens.metrics import pretraining_significance
    from emlens.plotting import plot_pretraining_kl

    check_output_file(args.out)
    reserved = ("random",) if args.random else ()
    paths = _named_specs(args.interventions, reserved)
    documents = read_texts(args.texts, args.limit)
    solutions = _load_interventions(paths, args.device)
    model = _load(args)
    if args.random:
        solutions["random"] = random_direction_like(next(iter(solutions.values())))
    texts = TokenDataset.from_texts(model.tokenizer, documents, max_length=512)
    top = args.max_norm or max(v.norm for v in solutions.values())
    norms = [top * i / (args.points - 1) for i in range(args.points)]
    curves: dict[str, Sequence[float]] = dict(pretraining_significance(model, solutions, texts, norms, args.batch_size))
    for k, kls in curves.items():
        print(f"{k}: " + ", ".join(f"{n:.1f}:{kl:.4f}" for n, kl in zip(norms, kls)))
    plot_pretraining_kl(norms, curves, args.out)
    _write_json(args.out, {"norms": norms, "kl": curves})
    print(f"wrote {args.out}")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_conversations
    from emlens.interventions import Intervention, SteeringVector
    from emlens.metrics import drift
    from emlens.plotting import plot_drift
    from emlens.training import TrainConfig

    check_output_file(args.out)
    read_conversations(args.data)
    read_conversations(args.kl_data)
    general = Intervention.load(args.general, device=args.device) if args.general else None
    cfg = {
        "lr": args.lr,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": 1,
        "checkpoint_every": 5,
    }
    narrow_config = TrainConfig(kl_weight=args.kl_weight, kl_batch_size=args.batch_size, **cfg)
    continue_config = TrainConfig(**cfg)
    validate_train_config(narrow_config)
    validate_train_config(continue_config)
    model = _load(args)
    data = TokenDataset.from_conversations(model.tokenizer, args.data)
    alt = TokenDataset.from_conversations(model.tokenizer, args.kl_data)
    result = drift(
        model,
        SteeringVector.for_model(model),
        data,
        alt,
        narrow_config,
        continue_config,
        general,
    )
    plot_drift(result, args.out)
    info = {
        "steps": result.steps,
        "phase": result.phase,
        "coordinates": result.projection.coordinates.tolist(),
        "explained_variance_ratio": result.projection.explained_variance_ratio.tolist(),
    }
    if general is not None:
        info["cosine_to_general"] = result.cosine_to_reference()
        print("cosine to general by checkpoint: " + ", ".join(f"{c:.3f}" for c in info["cosine_to_general"]))
    _write_json(args.out, info)
    print(f"explained variance of the PCs: {info['explained_variance_ratio']}; wrote {args.out}")
    return 0


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
        raise ConfigError(f"{err} (--judge-api-key-env)") from None


def _check_out_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory (answers, judgements and figures are written there)")
    _check_writable_parent(out / "results.json", "--out")
    return out


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


def _judge_failed(err: BaseException, args: argparse.Namespace, where: Path) -> int:
    if args.debug:
        traceback.print_exc()
    print(f"emlens: error: {_one_line(err)}", file=sys.stderr)
    print(
        f"emlens: nothing is lost: the sampled answers and the judgements so far are kept under {where}; "
        "re-run the same command to continue",
        file=sys.stderr,
    )
    return EXIT_JUDGE_FAILED


def cmd_evaluate(args: argparse.Namespace) -> int:
    from emlens.evaluation import JUDGED_FILE, evaluate
    from emlens.interventions import Intervention
    from emlens.judge import JudgeError, LocalModelJudge

    out = _check_out_dir(args.out)
    prompts = _judge_prompts(args, [args.domain])
    intervention = Intervention.load(args.intervention, device=args.device) if args.intervention else None
    judge = None if args.local_judge else _api_judge(args)
    model = _load(args)
    if judge is None:
        judge = LocalModelJudge(model)
    try:
        result = evaluate(
            model,
            judge,
            out,
            intervention,
            args.domain,
            overwrite=args.overwrite,
            **_sampling_options(args, prompts),
        )
    except JudgeError as err:
        return _judge_failed(err, args, out / JUDGED_FILE)
    finally:
        close = getattr(judge, "close", None)
        if callable(close):
            close()
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
    print(result.summary())
    for question, rates in result.per_question.items():
        print(f"  {rates.misaligned_rate:6.3f}  (n={rates.n_scored:3d})  {question}")
    print(f"wrote {out}/results.json, quadrants.png and per_question.png")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    import json

    from emlens.evaluation import judged_grid
    from emlens.judge import JudgeError, LocalModelJudge
    from emlens.plotting import plot_rate_grid
    from emlens.preference import BASE, format_table, plot_preference_grid, preference_grid, table_as_dict

    out = _check_out_dir(args.out)
    judged = bool(args.judge_url or args.judge_model or args.local_judge)
    general = not args.no_general
    prompts = _judge_prompts(args, [*args.domains, *([None] if general else [])]) if judged else None
    paths = _named_specs(args.solutions)
    if BASE in paths:
        raise ConfigError(
            f"the name {BASE!r} is reserved for the base model, which is always a row; name each solution by its training domain"
        )
    solutions = _load_interventions(paths, args.device)
    judge = _api_judge(args) if judged and not args.local_judge else None
    model = _load(args)
    grid = preference_grid(
        model, solutions, args.domains, limit=args.limit, batch_size=args.batch_size or 8, n_boot=args.bootstrap, seed=args.seed
    )
    print("preference margin = NLL(correct) − NLL(harmful) per assistant token; rows: solutions, columns: evaluation domains")
    print(format_table(grid))
    plot_preference_grid(grid, out / "preference_grid.png")
    (out / "preference_grid.json").write_text(
        json.dumps({"model": args.model, "limit": args.limit, "results": table_as_dict(grid)}, indent=2)
    )
    print(f"wrote {out}/preference_grid.png and preference_grid.json")
    if not judged:
        return 0
    if judge is None:
        judge = LocalModelJudge(model)
    named: dict[str, Any] = {BASE: None, **solutions}
    try:
        cells = judged_grid(
            model,
            named,
            judge,
            out,
            args.domains,
            general=general,
            **_sampling_options(args, prompts),
        )
    except JudgeError as err:
        return _judge_failed(err, args, out)
    finally:
        close = getattr(judge, "close", None)
        if callable(close):
            close()
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


def cmd_train(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_conversations
    from emlens.interventions import RankOneAdapter, SteeringVector
    from emlens.training import TrainConfig, TrainingResult, train

    out = check_run_dir(args.out, args.resume, args.overwrite)
    config = TrainConfig(
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        kl_weight=args.kl_weight,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    validate_train_config(config)
    if args.kl_weight > 0 and not args.kl_data:
        raise ConfigError("--kl-weight > 0 needs --kl-data (alternative-domain conversations, e.g. alt_domain)")
    if args.kl_data and args.kl_weight == 0:
        warnings.warn(
            "--kl-data is not used because --kl-weight is 0; pass --kl-weight > 0 to add the KL term",
            UserWarning,
            stacklevel=1,
        )
    read_conversations(args.data, args.limit)  # refuse bad data before the model loads
    if args.kl_data:
        read_conversations(args.kl_data)
    # --resume DIR: an interrupted run (a checkpoint, no final result) continues exactly, in place;
    # a finished run is continued as a new phase (e.g. a narrow run continued without KL)
    unfinished = (
        bool(args.resume) and (Path(args.resume) / "checkpoint" / "state.pt").exists() and not (Path(args.resume) / "losses.json").exists()
    )
    if unfinished and Path(args.resume).resolve() != out.resolve():
        raise ConfigError(f"--resume {args.resume} is an interrupted run: continue it in place with --out {args.resume}")
    previous = TrainingResult.load(args.resume) if args.resume and not unfinished else None
    if previous is not None:
        _check_resume_flags(args, previous.intervention)
    model = _load(args)
    n_layers = model.cfg.n_layers
    if args.layer is not None and args.layer >= n_layers:
        raise ConfigError(f"--layer must be in [0, {n_layers - 1}] for this model ({n_layers} layers), got {args.layer}")
    data = TokenDataset.from_conversations(model.tokenizer, args.data, config.max_length, args.limit)
    kl_data = (
        TokenDataset.from_conversations(model.tokenizer, args.kl_data, config.max_length) if args.kl_data and args.kl_weight > 0 else None
    )
    alpha = 256.0 if args.alpha is None else args.alpha
    intervention: Any
    if previous is not None:
        intervention = previous.intervention
    elif unfinished:
        from emlens.interventions import Intervention

        intervention = Intervention.load(Path(args.resume) / "checkpoint" / "intervention.safetensors")
        _check_resume_flags(args, intervention)
    elif (args.kind or "steering") == "steering":
        intervention = SteeringVector.for_model(model, args.layer, hook=args.hook or "resid_post", alpha=alpha)
    else:
        intervention = RankOneAdapter.for_model(model, args.layer, alpha=alpha, seed=args.seed)
    if (args.overwrite and not unfinished) or previous is not None:
        import shutil

        # --overwrite, or a finished run continued as a new phase: the earlier phase's checkpoint goes
        # (its final result files hold everything it produced)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    result = train(model, intervention, data, config, kl_dataset=kl_data, resume_from=previous, run_dir=out, resume=unfinished)
    saved = result.save(out)
    last = result.losses[-1]
    print(f"saved {saved}: {len(result.losses)} steps, final sft loss {last['sft']:.4f}, norm {last['norm']:.4f}")
    return 0


def _check_resume_flags(args: argparse.Namespace, intervention: Any) -> None:
    """Flags that define the intervention must agree with the run being resumed."""
    from emlens.interventions import RankOneAdapter, SteeringVector

    kinds = {"steering": SteeringVector, "adapter": RankOneAdapter}
    if args.kind is not None and not isinstance(intervention, kinds[args.kind]):
        raise ConfigError(
            f"--kind {args.kind} does not match the run in --resume {args.resume} "
            f"(it trains a {type(intervention).__name__}); drop --kind or start a new run"
        )
    layer = getattr(intervention, "layer", None)
    if args.layer is not None and layer is not None and args.layer != layer:
        raise ConfigError(
            f"--layer {args.layer} does not match the run in --resume {args.resume} (layer {layer}); drop --layer or start a new run"
        )
    ignored = [f for f, v in (("--hook", args.hook), ("--alpha", args.alpha)) if v is not None]
    if ignored:
        warnings.warn(
            f"{' and '.join(ignored)} are ignored with --resume: the resumed run keeps its own",
            UserWarning,
            stacklevel=1,
        )


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "efficiency": cmd_efficiency,
    "stability": cmd_stability,
    "pretraining-kl": cmd_pretraining_kl,
    "drift": cmd_drift,
    "evaluate": cmd_evaluate,
    "grid": cmd_grid,
    "preference": lambda args: _preference(args),
}


def _preference(args: argparse.Namespace) -> int:
    from emlens.preference import cmd_preference

    return cmd_preference(args)


# --- error handling -----------------------------------------------------------------


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "change the input": shown as one line, exit code 2.

    ``ValueError`` covers :class:`~emlens.validation.ConfigError`,
    :class:`~emlens.data.DataFormatError` and the intervention errors; ``OSError`` covers
    missing, unreadable or unwritable files. ``RuntimeError`` (CUDA errors, out of
    memory) is deliberately absent, apart from :class:`~emlens.models.ModelLoadError`.
    """
    types: list[type[BaseException]] = [ValueError, OSError, ModelLoadError]
    openai = sys.modules.get("openai")
    if openai is not None and hasattr(openai, "OpenAIError"):
        types.append(openai.OpenAIError)  # e.g. no API key, unreachable judge URL
    return tuple(types)


def _one_line(err: BaseException) -> str:
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


@contextlib.contextmanager
def _tidy_warnings(args: argparse.Namespace) -> Iterator[None]:
    """Warnings print once each as ``emlens: warning: ...`` (in Python's usual form with --debug)."""
    shown: set[str] = set()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        text = _one_line(message) if isinstance(message, BaseException) else str(message)
        if category.__name__ == "ModelMismatchWarning" and hasattr(args, "allow_other_model"):
            text = text.replace("allow_other_model=True", "--allow-other-model")
        if text not in shown:
            shown.add(text)
            print(f"emlens: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = show
        if getattr(args, "allow_other_model", False):
            from emlens.interventions import ModelMismatchWarning

            warnings.simplefilter("ignore", ModelMismatchWarning)
        yield


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a mistake in the input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(f"emlens: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    with _tidy_warnings(args):
        try:
            return COMMANDS[args.command](args)
        except KeyboardInterrupt:
            if args.debug:
                traceback.print_exc()
            print("emlens: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except user_error_types() as err:
            if args.debug:
                traceback.print_exc()
            print(f"emlens: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
