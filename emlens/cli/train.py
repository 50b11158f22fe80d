"""``emlens train``: train a steering vector or rank-1 adapter and save the run (the study's training stage, by hand)."""

from __future__ import annotations

import argparse
import shutil
from typing import Any

from emlens.cli import flags
from emlens.cli.runs import INTERVENTION_KINDS, data_source
from emlens.interventions import RankOneAdapter, SteeringVector
from emlens.study.config import TrainSection, adapter_defaults
from emlens.training import TrainConfig
from emlens.validation import ConfigError, check_run_dir

KL_FLAGS: flags.Flags = {
    "--kl-weight": ("kl_weight", flags.nonnegative_float, "per-token KL weight λ (paper ≈ 6.6 vector, 0.66 adapter)"),
    "--kl-batch-size": ("kl_batch_size", flags.positive_int, "KL conversations per optimiser step"),
}
TRAIN_FLAGS: flags.Flags = {  # the TrainConfig fields they set (--max-steps, with its own help, is added beside them)
    "--lr": ("lr", flags.positive_float, "learning rate (AdamW)"),
    "--epochs": ("epochs", flags.positive_float, "passes over the training data"),
    "--batch-size": ("batch_size", flags.positive_int, "conversations per micro-batch"),
    "--grad-accum": ("grad_accum", flags.positive_int, "micro-batches per optimiser step"),
    "--warmup": ("warmup_steps", flags.nonnegative_int, "linear warm-up steps of the learning rate"),
    "--max-length": ("max_length", flags.positive_int, "tokens per conversation (longer ones are cut)"),
    "--checkpoint-every": ("checkpoint_every", flags.positive_int, "steps between checkpoints"),
    "--seed": ("seed", flags.seed_value, "seed of the data order and initialisation"),
}


def add_train_flags(
    t: argparse.ArgumentParser,
    steps_help: str = "optimiser steps (default: --epochs passes over the data)",
    aliases: tuple[str, ...] = (),
) -> None:
    t.add_argument("--max-steps", dest="max_steps", type=flags.positive_int, default=None, help=steps_help)
    for alias in aliases:  # an older name of the flag, kept working (its errors name it)
        t.add_argument(alias, dest="max_steps", type=flags.positive_int, default=argparse.SUPPRESS, help="the same as --max-steps")
    flags.add_flags(t, TrainConfig, TRAIN_FLAGS)


def register(add: Any) -> None:
    t = add(
        "train",
        train_command,
        help="train a steering vector or rank-1 adapter",
        description="Train on assistant tokens of --data (a built-in set's train split unless you name one), optionally "
        "with λ·KL(p_base ‖ p_steered) on --kl-data. The run directory gets intervention.safetensors, config.json, "
        "losses.json and trajectory.pt, and checkpoints as it goes (--resume continues it).",
    )
    flags.add_model_flags(t)
    t.add_argument("--data", required=True, help="training JSONL or built-in set (e.g. medical_harmful = its train split)")
    t.add_argument(
        "--kind", choices=list(INTERVENTION_KINDS), default=None, help="what to train (default: steering; a resumed run keeps its own)"
    )
    t.add_argument("--layer", type=flags.nonnegative_int, default=None, help="layer L (default: the middle layer)")
    t.add_argument("--hook", default=None, help="steering hook name or shorthand (default resid_post; mlp_out, ...)")
    alpha = flags.default_of(SteeringVector, "alpha")  # RankOneAdapter's too
    t.add_argument("--alpha", type=flags.finite_float, default=None, help=f"fixed scale of the vector / adapter (default {alpha:g})")
    t.add_argument(
        "--kl-data",
        default=None,
        help="conversations for the KL term (default with --kl-weight > 0: the study's KL set for a built-in --data, e.g. kl:medical)",
    )
    flags.add_flags(t, TrainConfig, KL_FLAGS)
    add_train_flags(t)
    default_per_kind(t, "lr")
    t.add_argument("--limit", type=flags.positive_int, default=None, help="use only the first N training conversations (default: all)")
    t.add_argument("--resume", default=None, help="directory of an earlier run to continue from")
    t.add_argument("--out", required=True, help="output directory for the run")
    flags.add_allow_other_model(t)
    t.add_argument("--overwrite", action="store_true", help="write into --out even if it already holds files")


PER_KIND = ("lr", "kl_weight")  # settings whose study default depends on the kind trained


def default_per_kind(p: argparse.ArgumentParser, *fields: str) -> None:
    """Make each of ``fields``' flags default to the study's value for the kind trained (``None`` until
    :func:`train_config` knows the kind), and say both values in its help."""
    for field in fields:
        action = p._option_string_actions["--" + field.replace("_", "-")]
        action.default = None
        action.help = (
            f"{(action.help or '').split(' (default')[0]} (default: {getattr(TrainSection(), field):g} for a steering vector, "
            f"{getattr(adapter_defaults(), field):g} for an adapter: the paper's, as in emlens reproduce)"
        )


def train_config(args: argparse.Namespace, adapter: bool = False) -> TrainConfig:
    """The run's config; a per-kind setting left out (``None``, :func:`default_per_kind`) takes the study's value for the kind."""
    values = {**flags.values_of(args, TRAIN_FLAGS), **flags.values_of(args, KL_FLAGS)}
    defaults = adapter_defaults() if adapter else TrainSection()
    for field in PER_KIND:
        if values.get(field) is None:
            values[field] = getattr(defaults, field)
    return TrainConfig(max_steps=args.max_steps, **values)


def train_command(args: argparse.Namespace) -> int:
    from emlens.cli.runs import continuation, intervention_to_train, kl_set, tokenized
    from emlens.data import read_conversations
    from emlens.training import train

    out = check_run_dir(args.out, args.resume, args.overwrite)
    config = train_config(args)
    kl_source = kl_set(args.data, args.kl_data, args.kl_weight)
    if kl_source and not args.kl_data:
        print(f"KL set: {kl_source} (the study's default for {args.data})")
    read_conversations(data_source(args.data), args.limit)  # refuse bad data before the model loads
    if kl_source:
        read_conversations(data_source(kl_source))
    if args.hook is not None and args.kind is not None and INTERVENTION_KINDS[args.kind] is not SteeringVector:
        raise ConfigError(f"--hook places a steering vector; --kind {args.kind} acts on layer L's down_proj (leave --hook out)")
    ignored = [f for f, v in (("--hook", args.hook), ("--alpha", args.alpha)) if v is not None]
    previous, interrupted = continuation(args.resume, out, config.max_steps, args.kind, args.layer, ignored)
    model = flags.load_model_of(args)
    resumed = interrupted if previous is None else previous.intervention
    intervention = intervention_to_train(model, resumed, args.kind, args.layer, args.hook, args.alpha, args.seed)
    config = train_config(args, adapter=intervention.kind == RankOneAdapter.kind)
    data = tokenized(model, args.data, config.max_length, args.limit)
    kl_data = tokenized(model, kl_source, config.max_length) if kl_source and args.kl_weight > 0 else None
    if (args.overwrite and interrupted is None) or previous is not None:
        # --overwrite, or a finished run continued as a new phase: the earlier phase's checkpoint goes
        # (its final result files hold everything it produced)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    result = train(model, intervention, data, config, kl_dataset=kl_data, resume_from=previous, run_dir=out, resume=interrupted is not None)
    last = result.losses[-1]
    print(f"saved {result.save(out)}: {len(result.losses)} steps, final sft loss {last['sft']:.4f}, norm {last['norm']:.4f}")
    return 0
