"""``emlens efficiency``, ``stability``, ``pretraining-kl`` and ``drift``: the study's measurement stages, by hand.

Each calls the same function as ``emlens reproduce`` (:mod:`emlens.study.measures`), with the same
defaults (the :mod:`emlens.study.config` sections), and writes the same result: a figure and a
JSON of every number beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from emlens.cli.flags import (
    add_allow_other_model,
    add_figure_out,
    add_model_flags,
    add_named_interventions,
    at_least_two,
    check_figure_out,
    default_of,
    load_interventions,
    load_model_of,
    named_specs,
    nonnegative_int,
    positive_float,
    positive_int,
    seed_value,
    unit_interval,
)
from emlens.cli.train import add_train_flags, train_config, training_data
from emlens.study.config import DataSection, EfficiencySection, PretrainingKLSection, StabilitySection, StudyConfig, TrainSection

DEFAULT_BATCH = default_of(StudyConfig, "batch_size")


def _common(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH, help="conversations or documents per forward pass")
    add_figure_out(p)


def _scored_data(p: argparse.ArgumentParser) -> None:
    """The flags of a metric that scores conversations with named solutions (efficiency, stability)."""
    _common(p)
    add_named_interventions(p)
    p.add_argument("--data", required=True, help="conversations to score (a built-in set means its held-out split)")
    p.add_argument("--limit", type=positive_int, default=default_of(DataSection, "eval_rows"), help="rows of the data to score")
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=default_of(DataSection, "max_length"),
        help="tokens per conversation (longer ones are cut)",
    )


def register(add: Any) -> None:
    e = add("efficiency", efficiency_command, help="loss vs norm of rescaled solutions (Fig. 4a)")
    _scored_data(e)
    e.add_argument("--points", type=at_least_two, default=default_of(EfficiencySection, "points"), help="norms on the grid (>= 2)")
    e.add_argument(
        "--max-factor",
        type=positive_float,
        default=default_of(EfficiencySection, "max_factor"),
        help="largest norm, as a multiple of the largest solution norm",
    )

    st = add("stability", stability_command, help="loss under norm-preserving orthogonal noise (Fig. 4b)")
    _scored_data(st)
    st.add_argument(
        "--epsilons",
        type=unit_interval,
        nargs="+",
        default=default_of(StabilitySection, "epsilons"),
        help="noise strengths ε in [0, 1] (sorted; duplicates refused)",
    )
    st.add_argument(
        "--seeds", type=positive_int, default=len(default_of(StabilitySection, "seeds")), help="noise draws per ε (seeds 0…N-1)"
    )
    st.add_argument(
        "--norm",
        choices=["min", "own"],
        default=default_of(StabilitySection, "norm"),
        help="compare every solution rescaled to the smallest solution norm (min) or each at its own trained norm (own); recorded in the JSON",
    )
    st.add_argument("--absolute", action="store_true", help="plot the raw loss instead of the relative loss")

    pk = add("pretraining-kl", pretraining_kl_command, help="KL from the base model on web text at equal norms (Fig. 6)")
    _common(pk)
    add_named_interventions(pk)
    pk.add_argument("--texts", default="web_text", help=".txt / JSONL of {'text'} documents, or the built-in web_text")
    pk.add_argument("--limit", type=positive_int, default=default_of(DataSection, "web_docs"), help="documents to use")
    pk.add_argument(
        "--max-tokens",
        type=positive_int,
        default=default_of(DataSection, "web_max_tokens"),
        help="tokens per document (longer ones are cut)",
    )
    pk.add_argument(
        "--max-norm", type=positive_float, default=None, help="largest norm on the grid (default: --max-factor × the largest solution norm)"
    )
    pk.add_argument(
        "--max-factor",
        type=positive_float,
        default=default_of(PretrainingKLSection, "max_factor"),
        help="largest norm, as a multiple of the largest solution norm",
    )
    pk.add_argument("--points", type=at_least_two, default=default_of(PretrainingKLSection, "points"), help="norms on the grid (>= 2)")
    pk.add_argument(
        "--random",
        type=nonnegative_int,
        nargs="?",
        const=default_of(PretrainingKLSection, "n_random"),
        default=default_of(PretrainingKLSection, "n_random"),
        help="random directions to compare with (0: none; a bare --random: the default)",
    )
    pk.add_argument("--seed", type=seed_value, default=0, help="seed of the random directions")

    dr = add(
        "drift",
        drift_command,
        help="narrow run with KL, continued without KL; PCA of the checkpoints (Fig. 5)",
        description="Trains a narrow steering vector (--kl-weight > 0), then continues it for as many steps without the KL "
        "term, and projects every checkpoint (with --general's run, when given) on a joint PCA. The two runs are saved "
        "beside the figure in OUT_runs/narrow and OUT_runs/continued, like `emlens train` saves a run.",
    )
    add_model_flags(dr)
    add_figure_out(dr)
    dr.add_argument("--data", required=True, help="training conversations (a built-in set means its train split)")
    dr.add_argument("--kl-data", default=None, help="conversations for the KL term (default: the study's KL set for a built-in --data)")
    dr.add_argument(
        "--kl-weight",
        type=positive_float,
        default=default_of(TrainSection, "kl_weight"),
        help="per-token KL weight λ of the narrow phase (> 0)",
    )
    dr.add_argument(
        "--kl-batch-size", type=positive_int, default=default_of(TrainSection, "kl_batch_size"), help="KL conversations per optimiser step"
    )
    dr.add_argument("--layer", type=nonnegative_int, default=None, help="layer L (default: the middle layer)")
    add_train_flags(dr, steps_help="optimiser steps in each phase (default: one pass of --epochs over the data)", aliases=("--steps",))
    dr.add_argument("--general", default=None, help="the general solution's run directory or .safetensors, shown in the same PCA")
    add_allow_other_model(dr)


def _measure_data(args: argparse.Namespace) -> str:
    return training_data(args.data, split="heldout")


def efficiency_command(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_conversations
    from emlens.plotting import plot_efficiency
    from emlens.study.measures import measure_efficiency, write_result

    out = check_figure_out(args.out)
    source = _measure_data(args)
    read_conversations(source, args.limit)  # refuse bad data before the model loads
    solutions = load_interventions(named_specs(args.interventions), args.device)
    model = load_model_of(args)
    data = TokenDataset.from_conversations(model.tokenizer, source, args.max_length, args.limit)
    result = measure_efficiency(model, solutions, data, EfficiencySection(args.points, args.max_factor), args.batch_size)
    result["data"] = source
    print("norm    " + "  ".join(f"{k:>10}" for k in result["loss"]))
    for i, n in enumerate(result["norms"]):
        print(f"{n:7.2f} " + "  ".join(f"{curve[i]:10.4f}" for curve in result["loss"].values()))
    plot_efficiency(result["norms"], result["loss"], out)
    print(f"wrote {out} and {write_result(result, out)}")
    return 0


def stability_command(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_conversations
    from emlens.plotting import plot_stability
    from emlens.study.measures import measure_stability, stability_curves, write_result

    out = check_figure_out(args.out)
    source = _measure_data(args)
    read_conversations(source, args.limit)
    solutions = load_interventions(named_specs(args.interventions), args.device)
    section = StabilitySection(epsilons=list(args.epsilons), seeds=list(range(args.seeds)), norm=args.norm)
    StudyConfig(stability=section)  # the same checks as a study config (duplicates refused)
    model = load_model_of(args)
    data = TokenDataset.from_conversations(model.tokenizer, source, args.max_length, args.limit)
    result = measure_stability(model, solutions, data, section, args.batch_size)
    result["data"] = source
    for name, r in result["results"].items():
        by_eps = ", ".join(f"{e:g}:{m:.1f}" for e, m in zip(r["epsilons"], r["relative_mean"]))
        print(f"{name} at norm {result['compared_at_norm'][name]:.3f}: base loss {r['base_loss']:.4f}; relative loss by ε: {by_eps}")
    plot_stability(stability_curves(result, relative=not args.absolute), out, relative=not args.absolute)
    print(f"wrote {out} and {write_result(result, out)}")
    return 0


def pretraining_kl_command(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_texts
    from emlens.plotting import plot_pretraining_kl
    from emlens.study.measures import measure_pretraining_kl, write_result

    out = check_figure_out(args.out)
    paths = named_specs(args.interventions, reserved=("random", *(f"random {k + 1}" for k in range(args.random))) if args.random else ())
    documents = read_texts(args.texts, args.limit)
    solutions = load_interventions(paths, args.device)
    model = load_model_of(args)
    texts = TokenDataset.from_texts(model.tokenizer, documents, max_length=args.max_tokens)
    section = PretrainingKLSection(points=args.points, max_factor=args.max_factor, n_random=args.random)
    result = measure_pretraining_kl(model, solutions, texts, section, args.batch_size, seed=args.seed, max_norm=args.max_norm)
    result["texts"] = args.texts
    for k, kls in result["kl"].items():
        print(f"{k}: " + ", ".join(f"{n:.1f}:{kl:.4f}" for n, kl in zip(result["norms"], kls)))
    plot_pretraining_kl(result["norms"], result["kl"], out)
    print(f"wrote {out} and {write_result(result, out)}")
    return 0


def drift_command(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_conversations
    from emlens.data.studies import default_kl_for
    from emlens.interventions import Intervention, SteeringVector
    from emlens.metrics import drift
    from emlens.plotting import plot_drift
    from emlens.study.measures import write_result
    from emlens.training import TrainingResult
    from emlens.validation import ConfigError

    out = check_figure_out(args.out)
    runs = out.with_name(f"{out.stem}_runs")
    data_source, kl_source = training_data(args.data), args.kl_data or default_kl_for(args.data)
    if kl_source is None:
        raise ConfigError("drift needs --kl-data (conversations from other domains) for a --data that is not built in")
    read_conversations(data_source)
    read_conversations(training_data(kl_source))
    general_path = Path(args.general) if args.general else None
    general: Intervention | TrainingResult | None = None
    if general_path is not None:
        general = TrainingResult.load(general_path) if general_path.is_dir() else Intervention.load(general_path, device=args.device)
    config = train_config(args)
    model = load_model_of(args)
    data = TokenDataset.from_conversations(model.tokenizer, data_source, config.max_length)
    kl_data = TokenDataset.from_conversations(model.tokenizer, training_data(kl_source), config.max_length)
    result = drift(model, SteeringVector.for_model(model, args.layer), data, kl_data, config, config, general=general)
    result.narrow.save(runs / "narrow")
    result.continued.save(runs / "continued")
    info = {**result.result, "runs": {"narrow": str(runs / "narrow"), "continued": str(runs / "continued")}}
    if "cosine_to_general" in info:
        print("cosine to general by checkpoint: " + ", ".join(f"{c:.3f}" for c in info["cosine_to_general"]))
    general_coords = np.asarray(info["general_coordinates"]) if info["general_coordinates"] else None
    plot_drift(np.asarray(info["coordinates"]), info["phase"], info["explained_variance_ratio"], out, general=general_coords)
    print(f"saved the runs in {runs}/narrow and {runs}/continued")
    print(f"explained variance of the PCs: {info['explained_variance_ratio']}; wrote {out} and {write_result(info, out)}")
    return 0
