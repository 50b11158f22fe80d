"""``emlens train``: train a steering vector or rank-1 adapter and save the run (the study's training stage, by hand)."""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path
from typing import Any

from emlens.cli.flags import (
    Flags,
    add_allow_other_model,
    add_flags,
    add_model_flags,
    default_of,
    finite_float,
    load_model_of,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    seed_value,
    values_of,
)
from emlens.interventions import RankOneAdapter, SteeringVector
from emlens.training import TrainConfig, data_source
from emlens.validation import ConfigError, check_run_dir

KL_FLAGS: Flags = {
    "--kl-weight": ("kl_weight", nonnegative_float, "per-token KL weight λ (paper ≈ 6.6 vector, 0.66 adapter)"),
    "--kl-batch-size": ("kl_batch_size", positive_int, "KL conversations per optimiser step"),
}
TRAIN_FLAGS: Flags = {  # the TrainConfig fields they set (--max-steps, with its own help, is added beside them)
    "--lr": ("lr", positive_float, "learning rate (AdamW)"),
    "--epochs": ("epochs", positive_float, "passes over the training data"),
    "--batch-size": ("batch_size", positive_int, "conversations per micro-batch"),
    "--grad-accum": ("grad_accum", positive_int, "micro-batches per optimiser step"),
    "--warmup": ("warmup_steps", nonnegative_int, "linear warm-up steps of the learning rate"),
    "--max-length": ("max_length", positive_int, "tokens per conversation (longer ones are cut)"),
    "--checkpoint-every": ("checkpoint_every", positive_int, "steps between checkpoints"),
    "--seed": ("seed", seed_value, "seed of the data order and initialisation"),
}


def add_train_flags(
    t: argparse.ArgumentParser,
    steps_help: str = "optimiser steps (default: one pass of --epochs over the data)",
    aliases: tuple[str, ...] = (),
) -> None:
    t.add_argument("--max-steps", dest="max_steps", type=positive_int, default=None, help=steps_help)
    for alias in aliases:  # an older name of the flag, kept working (its errors name it)
        t.add_argument(alias, dest="max_steps", type=positive_int, default=argparse.SUPPRESS, help="the same as --max-steps")
    add_flags(t, TrainConfig, TRAIN_FLAGS)


def register(add: Any) -> None:
    t = add(
        "train",
        train_command,
        help="train a steering vector or rank-1 adapter",
        description="Train on assistant tokens of --data (a built-in set's train split unless you name one), optionally "
        "with λ·KL(p_base ‖ p_steered) on --kl-data. The run directory gets intervention.safetensors, config.json, "
        "losses.json and trajectory.pt, and checkpoints as it goes (--resume continues it).",
    )
    add_model_flags(t)
    t.add_argument("--data", required=True, help="training JSONL or built-in set (e.g. medical_harmful = its train split)")
    t.add_argument(
        "--kind", choices=["steering", "adapter"], default=None, help="what to train (default: steering; a resumed run keeps its own)"
    )
    t.add_argument("--layer", type=nonnegative_int, default=None, help="layer L (default: the middle layer)")
    t.add_argument("--hook", default=None, help="steering hook name or shorthand (default resid_post; mlp_out, ...)")
    alpha = default_of(SteeringVector, "alpha")  # RankOneAdapter's too
    t.add_argument("--alpha", type=finite_float, default=None, help=f"fixed scale of the vector / adapter (default {alpha:g})")
    t.add_argument(
        "--kl-data",
        default=None,
        help="conversations for the KL term (default with --kl-weight > 0: the study's KL set for a built-in --data, e.g. kl:medical)",
    )
    add_flags(t, TrainConfig, KL_FLAGS)
    add_train_flags(t)
    t.add_argument("--limit", type=positive_int, default=None, help="use only the first N training conversations (default: all)")
    t.add_argument("--resume", default=None, help="directory of an earlier run to continue from")
    t.add_argument("--out", required=True, help="output directory for the run")
    add_allow_other_model(t)
    t.add_argument("--overwrite", action="store_true", help="write into --out even if it already holds files")


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(max_steps=args.max_steps, **values_of(args, TRAIN_FLAGS), **values_of(args, KL_FLAGS))


def train_command(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_conversations
    from emlens.data.studies import default_kl_for
    from emlens.training import resume_point, train

    out = check_run_dir(args.out, args.resume, args.overwrite)
    config = train_config(args)
    kl_source = args.kl_data
    if args.kl_weight > 0 and not kl_source:
        kl_source = default_kl_for(args.data)
        if kl_source is None:
            raise ConfigError("--kl-weight > 0 needs --kl-data (conversations from other domains, e.g. kl:medical)")
        print(f"KL set: {kl_source} (the study's default for {args.data})")
    if kl_source and args.kl_weight == 0:
        warnings.warn("--kl-data is not used because --kl-weight is 0; pass --kl-weight > 0 to add the KL term", UserWarning, stacklevel=1)
    read_conversations(data_source(args.data), args.limit)  # refuse bad data before the model loads
    if kl_source:
        read_conversations(data_source(kl_source))
    previous, interrupted = resume_point(args.resume, out)
    resumed = interrupted if previous is None else previous.intervention
    if resumed is not None:
        _check_resume_flags(args, resumed)
    if previous is not None and args.resume is not None and out.resolve() == Path(args.resume).resolve():
        warnings.warn(
            f"--resume {args.resume} is a finished run: continuing it in place trains a second phase of "
            f"{config.max_steps or 'one pass of'} steps after its step {previous.losses[-1]['step'] if previous.losses else 0}, and its "
            "intervention.safetensors and losses.json are replaced by the continued run's (the losses keep both phases); "
            "to keep the first phase's files, continue into a new --out",
            UserWarning,
            stacklevel=1,
        )
    model = load_model_of(args)
    if args.layer is not None and args.layer >= model.cfg.n_layers:
        n = model.cfg.n_layers
        raise ConfigError(f"--layer must be in [0, {n - 1}] for this model ({n} layers), got {args.layer}")
    data = TokenDataset.from_conversations(model.tokenizer, data_source(args.data), config.max_length, args.limit)
    kl_data = (
        TokenDataset.from_conversations(model.tokenizer, data_source(kl_source), config.max_length)
        if kl_source and args.kl_weight > 0
        else None
    )
    alpha = {} if args.alpha is None else {"alpha": args.alpha}
    intervention: Any = resumed
    if resumed is None and (args.kind or "steering") == "steering":
        intervention = SteeringVector.for_model(model, args.layer, hook=args.hook or "resid_post", **alpha)
    elif resumed is None:
        intervention = RankOneAdapter.for_model(model, args.layer, seed=args.seed, **alpha)
    if (args.overwrite and interrupted is None) or previous is not None:
        # --overwrite, or a finished run continued as a new phase: the earlier phase's checkpoint goes
        # (its final result files hold everything it produced)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    result = train(model, intervention, data, config, kl_dataset=kl_data, resume_from=previous, run_dir=out, resume=interrupted is not None)
    last = result.losses[-1]
    print(f"saved {result.save(out)}: {len(result.losses)} steps, final sft loss {last['sft']:.4f}, norm {last['norm']:.4f}")
    return 0


def _check_resume_flags(args: argparse.Namespace, intervention: Any) -> None:
    """Flags that define the intervention must agree with the run being resumed."""
    kinds = {"steering": SteeringVector.kind, "adapter": RankOneAdapter.kind}
    if args.kind is not None and intervention.kind != kinds[args.kind]:
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
        warnings.warn(f"{' and '.join(ignored)} are ignored with --resume: the resumed run keeps its own", UserWarning, stacklevel=1)
