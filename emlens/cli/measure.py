"""``emlens efficiency``, ``stability``, ``pretraining-kl`` and ``drift``: the study's measurement stages, by hand.

Each calls the same function as ``emlens reproduce`` (:mod:`emlens.study.measures`), with the same
defaults (the :mod:`emlens.study.config` sections), and writes the same result: a figure and a
JSON of every number beside it (:func:`~emlens.study.measures.save_result`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from emlens.cli import flags
from emlens.cli.runs import INTERVENTION_KINDS, data_source
from emlens.cli.train import add_train_flags, default_per_kind, train_config
from emlens.study.config import DataSection, EfficiencySection, PretrainingKLSection, StabilitySection, StudyConfig, TrainSection
from emlens.study.measures import RANDOM_PREFIX, describe, measure_pretraining_kl, save_result
from emlens.validation import ConfigError, check_figure_file, named_paths

NORM_GRID = "largest norm, as a multiple of the largest solution norm"
SCORED: flags.Flags = {  # efficiency and stability score conversations with named solutions
    "--limit": ("eval_rows", flags.positive_int, "held-out rows of the data to score (the first N)"),
    "--max-length": ("max_length", flags.positive_int, "tokens per conversation (longer ones are cut)"),
}
EFFICIENCY: flags.Flags = {
    "--points": ("points", flags.at_least_two, "norms on the grid (>= 2)"),
    "--max-factor": ("max_factor", flags.positive_float, NORM_GRID + " (the grid runs from 0)"),
}
TEXTS: flags.Flags = {
    "--limit": ("web_docs", flags.positive_int, "web documents to use (the first N)"),
    "--max-tokens": ("web_max_tokens", flags.positive_int, "tokens per document (longer ones are cut)"),
}
KL_GRID: flags.Flags = {
    "--max-factor": ("max_factor", flags.positive_float, NORM_GRID + " (the grid runs from 0; 1: up to the largest solution's own norm)"),
    "--points": ("points", flags.at_least_two, "norms on the grid (>= 2)"),
}
DRIFT_KL: flags.Flags = {
    "--kl-weight": ("kl_weight", flags.positive_float, "per-token KL weight λ of the narrow phase (> 0)"),
    "--kl-batch-size": ("kl_batch_size", flags.positive_int, "KL conversations per optimiser step"),
}


def _common(p: argparse.ArgumentParser, scored: bool = True) -> None:
    flags.add_model_flags(p)
    flags.add_flags(p, StudyConfig, {"--batch-size": ("batch_size", flags.positive_int, "conversations or documents per forward pass")})
    flags.add_figure_out(p)
    flags.add_named_interventions(p)
    if scored:
        p.add_argument("--data", required=True, help="conversations to score (a built-in set means its held-out split)")
        flags.add_flags(p, DataSection, SCORED)


def register(add: Any) -> None:
    e = add("efficiency", efficiency_command, help="loss vs norm of rescaled solutions (Fig. 4a)")
    _common(e)
    flags.add_flags(e, EfficiencySection, EFFICIENCY)

    st = add("stability", stability_command, help="loss under norm-preserving orthogonal noise (Fig. 4b)")
    _common(st)
    st.add_argument(
        "--epsilons",
        type=flags.unit_interval,
        nargs="+",
        default=flags.default_of(StabilitySection, "epsilons"),
        help="noise strengths ε in [0, 1] (sorted; duplicates refused)",
    )
    st.add_argument(
        "--seeds", type=flags.positive_int, default=len(flags.default_of(StabilitySection, "seeds")), help="noise draws per ε (seeds 0…N-1)"
    )
    st.add_argument(
        "--norm",
        choices=["min", "own"],
        default=flags.default_of(StabilitySection, "norm"),
        help="compare every solution rescaled to the smallest solution norm (min) or each at its own trained norm (own); recorded in the JSON",
    )
    st.add_argument("--absolute", action="store_true", help="plot the raw loss instead of the relative loss")

    pk = add("pretraining-kl", pretraining_kl_command, help="KL from the base model on web text at equal norms (Fig. 6)")
    _common(pk, scored=False)
    pk.add_argument("--texts", default="web_text", help=".txt / JSONL of {'text'} documents, or the built-in web_text")
    flags.add_flags(pk, DataSection, TEXTS)
    pk.add_argument(
        "--max-norm",
        type=flags.positive_float,
        default=None,
        help="largest norm on the grid (default: --max-factor × the largest solution norm)",
    )
    flags.add_flags(pk, PretrainingKLSection, KL_GRID)
    n_random = flags.default_of(PretrainingKLSection, "n_random")
    pk.add_argument(
        "--random",
        type=flags.nonnegative_int,
        nargs="?",
        const=n_random,
        default=n_random,
        help="random directions to compare with (0: none; a bare --random: the default)",
    )
    flags.add_flags(pk, measure_pretraining_kl, {"--seed": ("seed", flags.seed_value, "seed of the random directions")})

    dr = add(
        "drift",
        drift_command,
        help="narrow run with KL, continued without KL; PCA of the checkpoints (Fig. 5)",
        description="Trains a narrow steering vector or rank-1 adapter (--kl-weight > 0), then continues it for as many steps "
        "without the KL term, and projects every checkpoint (with --general's run, when given) on a joint PCA. The two runs "
        "are saved beside the figure in OUT_runs/narrow and OUT_runs/continued, like `emlens train` saves a run.",
    )
    flags.add_model_flags(dr)
    flags.add_figure_out(dr)
    dr.add_argument("--data", required=True, help="training conversations (a built-in set means its train split)")
    dr.add_argument("--kl-data", default=None, help="conversations for the KL term (default: the study's KL set for a built-in --data)")
    dr.add_argument("--kind", choices=list(INTERVENTION_KINDS), default="steering", help="what to train")
    flags.add_flags(dr, TrainSection, DRIFT_KL)
    dr.add_argument("--layer", type=flags.nonnegative_int, default=None, help="layer L (default: the middle layer)")
    add_train_flags(dr, steps_help="optimiser steps in each phase (default: --epochs passes over the data)", aliases=("--steps",))
    default_per_kind(dr, "lr", "kl_weight")
    dr.add_argument("--general", default=None, help="the general solution's run directory or .safetensors, shown in the same PCA")
    flags.add_allow_other_model(dr)


def _scored(args: argparse.Namespace) -> tuple[Path, str, dict[str, Any], Any, Any]:
    """Efficiency and stability: the figure path, the held-out data, the solutions, the model and the tokenised data."""
    from emlens.data import TokenDataset, read_conversations

    out = check_figure_file(args.out)
    source = data_source(args.data, split="heldout")
    read_conversations(source, args.limit)  # refuse bad data before the model loads
    solutions = flags.load_interventions(named_paths(args.interventions, reserved_prefix=RANDOM_PREFIX), args.device)
    if args.command == "stability":
        StudyConfig(stability=_stability_section(args))  # the same checks as a study config (duplicates refused)
    model = flags.load_model_of(args)
    return out, source, solutions, model, TokenDataset.from_conversations(model.tokenizer, source, args.max_length, args.limit)


def _stability_section(args: argparse.Namespace) -> StabilitySection:
    return StabilitySection(epsilons=list(args.epsilons), seeds=list(range(args.seeds)), norm=args.norm)


def _report(result: dict[str, Any], out: Path, **figure: Any) -> int:
    print(describe(result))
    print(f"wrote {out} and {save_result(result, out, **figure)}")
    return 0


def efficiency_command(args: argparse.Namespace) -> int:
    from emlens.study.measures import measure_efficiency

    out, source, solutions, model, data = _scored(args)
    result = measure_efficiency(model, solutions, data, EfficiencySection(args.points, args.max_factor), args.batch_size)
    return _report({**result, "data": source}, out)


def stability_command(args: argparse.Namespace) -> int:
    from emlens.study.measures import measure_stability

    out, source, solutions, model, data = _scored(args)
    result = measure_stability(model, solutions, data, _stability_section(args), args.batch_size)
    return _report({**result, "data": source}, out, relative=not args.absolute)


def pretraining_kl_command(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_texts

    out = check_figure_file(args.out)
    paths = named_paths(args.interventions, reserved_prefix=RANDOM_PREFIX)
    documents = read_texts(args.texts, args.limit)
    solutions = flags.load_interventions(paths, args.device)
    model = flags.load_model_of(args)
    texts = TokenDataset.from_texts(model.tokenizer, documents, max_length=args.max_tokens)
    section = PretrainingKLSection(points=args.points, max_factor=args.max_factor, n_random=args.random)
    result = measure_pretraining_kl(model, solutions, texts, section, args.batch_size, seed=args.seed, max_norm=args.max_norm)
    return _report({**result, "texts": args.texts}, out)


def drift_command(args: argparse.Namespace) -> int:
    from emlens.cli.runs import intervention_to_train, load_trained, tokenized
    from emlens.data import read_conversations
    from emlens.data.studies import default_kl_for
    from emlens.study.measures import measure_drift
    from emlens.training import TrainingResult

    out = check_figure_file(args.out)
    runs = out.with_name(f"{out.stem}_runs")
    if runs.exists() and any(runs.iterdir()):  # another drift's runs (the same --out stem, any figure suffix)
        raise ConfigError(f"{runs} already holds the runs of an earlier drift with this --out; choose another --out or delete it")
    data_name, kl_name = data_source(args.data), args.kl_data or default_kl_for(args.data)
    if kl_name is None:
        raise ConfigError("drift needs --kl-data (conversations from other domains) for a --data that is not built in")
    read_conversations(data_name)
    read_conversations(data_source(kl_name))
    general = load_trained(args.general, args.device) if args.general else None
    trained = general.intervention if isinstance(general, TrainingResult) else general
    if trained is not None and trained.kind != INTERVENTION_KINDS[args.kind].kind:
        raise ConfigError(
            f"--general {args.general} is a {type(trained).__name__} but --kind {args.kind} trains a "
            f"{INTERVENTION_KINDS[args.kind].__name__}: one PCA needs one kind (pass --kind to match)"
        )
    config = train_config(args, adapter=args.kind == "adapter")
    model = flags.load_model_of(args)
    data, kl_data = (tokenized(model, n, config.max_length) for n in (args.data, kl_name))
    intervention = intervention_to_train(model, None, args.kind, args.layer, seed=args.seed)
    if trained is not None and trained.hook_names() != intervention.hook_names():
        raise ConfigError(
            f"--general {args.general} acts at {', '.join(trained.hook_names())}, but this run trains at "
            f"{', '.join(intervention.hook_names())}: cosines and one PCA compare solutions at one site (pass --layer "
            f"{trained.layer})"
        )
    result = measure_drift(model, data, kl_data, config, general=general, runs=runs, intervention=intervention)
    print(f"saved the runs in {runs}/narrow and {runs}/continued")
    return _report(result, out)
