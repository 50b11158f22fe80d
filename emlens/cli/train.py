"""``emlens train``: train a steering vector or rank-1 adapter and save the run (the study's training stage, by hand)."""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path
from typing import Any

from emlens.cli.flags import (
    add_allow_other_model,
    add_model_flags,
    check_run_dir,
    default_of,
    finite_float,
    load_model_of,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    seed_value,
)
from emlens.interventions import RankOneAdapter, SteeringVector
from emlens.training import TrainConfig
from emlens.validation import ConfigError, validate_train_config

DEFAULT_ALPHA = 256.0  # the paper's alpha for both kinds (SteeringVector / RankOneAdapter default)


def training_data(source: str, split: str = "train") -> str:
    """A built-in set named without a split means its ``split`` (training: ``train``); files are taken whole."""
    from emlens.data.studies import BUILTIN_DIR, SPLITS

    base, _, suffix = str(source).rpartition(":")
    if suffix in SPLITS or str(source).startswith("kl:"):
        return str(source)
    if not Path(source).exists() and (BUILTIN_DIR / f"{source}.jsonl").exists() and str(source) != "web_text":
        return f"{source}:{split}"
    return str(source)


def add_train_flags(
    t: argparse.ArgumentParser,
    steps_help: str = "optimiser steps (default: one pass of --epochs over the data)",
    aliases: tuple[str, ...] = (),
) -> None:
    t.add_argument("--lr", type=positive_float, default=default_of(TrainConfig, "lr"), help="learning rate (AdamW)")
    t.add_argument("--epochs", type=positive_float, default=default_of(TrainConfig, "epochs"), help="passes over the training data")
    t.add_argument("--max-steps", dest="max_steps", type=positive_int, default=None, help=steps_help)
    for alias in aliases:  # an older name of the flag, kept working (its errors name it)
        t.add_argument(alias, dest="max_steps", type=positive_int, default=argparse.SUPPRESS, help="the same as --max-steps")
    t.add_argument("--batch-size", type=positive_int, default=default_of(TrainConfig, "batch_size"), help="conversations per micro-batch")
    t.add_argument(
        "--grad-accum", type=positive_int, default=default_of(TrainConfig, "grad_accum"), help="micro-batches per optimiser step"
    )
    t.add_argument(
        "--warmup", type=nonnegative_int, default=default_of(TrainConfig, "warmup_steps"), help="linear warm-up steps of the learning rate"
    )
    t.add_argument(
        "--max-length",
        type=positive_int,
        default=default_of(TrainConfig, "max_length"),
        help="tokens per conversation (longer ones are cut)",
    )
    t.add_argument(
        "--checkpoint-every", type=positive_int, default=default_of(TrainConfig, "checkpoint_every"), help="steps between checkpoints"
    )
    t.add_argument("--seed", type=seed_value, default=default_of(TrainConfig, "seed"), help="seed of the data order and initialisation")


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
    t.add_argument("--alpha", type=finite_float, default=None, help=f"fixed scale of the vector / adapter (default {DEFAULT_ALPHA:g})")
    t.add_argument(
        "--kl-data",
        default=None,
        help="conversations for the KL term (default with --kl-weight > 0: the study's KL set for a built-in --data, e.g. kl:medical)",
    )
    t.add_argument(
        "--kl-weight",
        type=nonnegative_float,
        default=default_of(TrainConfig, "kl_weight"),
        help="per-token KL weight λ (paper ≈ 6.6 vector, 0.66 adapter)",
    )
    t.add_argument(
        "--kl-batch-size", type=positive_int, default=default_of(TrainConfig, "kl_batch_size"), help="KL conversations per optimiser step"
    )
    add_train_flags(t)
    t.add_argument("--limit", type=positive_int, default=None, help="use only the first N training conversations (default: all)")
    t.add_argument("--resume", default=None, help="directory of an earlier run to continue from")
    t.add_argument("--out", required=True, help="output directory for the run")
    add_allow_other_model(t)
    t.add_argument("--overwrite", action="store_true", help="write into --out even if it already holds files")


def train_config(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig(
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup,
        max_length=args.max_length,
        kl_weight=args.kl_weight,
        kl_batch_size=args.kl_batch_size,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    validate_train_config(config)
    return config


def train_command(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_conversations
    from emlens.data.studies import default_kl_for
    from emlens.training import TrainingResult, train

    out = check_run_dir(args.out, args.resume, args.overwrite)
    config = train_config(args)
    data_source = training_data(args.data)
    kl_source = args.kl_data
    if args.kl_weight > 0 and not kl_source:
        kl_source = default_kl_for(args.data)
        if kl_source is None:
            raise ConfigError("--kl-weight > 0 needs --kl-data (conversations from other domains, e.g. kl:medical)")
        print(f"KL set: {kl_source} (the study's default for {args.data})")
    if kl_source and args.kl_weight == 0:
        warnings.warn("--kl-data is not used because --kl-weight is 0; pass --kl-weight > 0 to add the KL term", UserWarning, stacklevel=1)
    read_conversations(data_source, args.limit)  # refuse bad data before the model loads
    if kl_source:
        read_conversations(training_data(kl_source))
    # --resume DIR: an interrupted run (a checkpoint, no final result) continues exactly, in place;
    # a finished run is continued as a new phase (e.g. a narrow run continued without KL)
    resume = Path(args.resume) if args.resume else None
    unfinished = resume is not None and (resume / "checkpoint" / "state.pt").exists() and not (resume / "losses.json").exists()
    if unfinished and resume is not None and resume.resolve() != out.resolve():
        raise ConfigError(f"--resume {args.resume} is an interrupted run: continue it in place with --out {args.resume}")
    previous = TrainingResult.load(resume) if resume is not None and not unfinished else None
    if previous is not None:
        _check_resume_flags(args, previous.intervention)
        if resume is not None and resume.resolve() == out.resolve():
            warnings.warn(
                f"--resume {args.resume} is a finished run: continuing it in place trains a second phase of "
                f"{config.max_steps or 'one pass of'} steps after its step {previous.losses[-1]['step'] if previous.losses else 0}, and its "
                "intervention.safetensors and losses.json are replaced by the continued run's (the losses keep both phases); "
                "to keep the first phase's files, continue into a new --out",
                UserWarning,
                stacklevel=1,
            )
    model = load_model_of(args)
    n_layers = model.cfg.n_layers
    if args.layer is not None and args.layer >= n_layers:
        raise ConfigError(f"--layer must be in [0, {n_layers - 1}] for this model ({n_layers} layers), got {args.layer}")
    data = TokenDataset.from_conversations(model.tokenizer, data_source, config.max_length, args.limit)
    kl_data = (
        TokenDataset.from_conversations(model.tokenizer, training_data(kl_source), config.max_length)
        if kl_source and args.kl_weight > 0
        else None
    )
    alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
    intervention: Any
    if previous is not None:
        intervention = previous.intervention
    elif unfinished and resume is not None:
        from emlens.interventions import Intervention

        intervention = Intervention.load(resume / "checkpoint" / "intervention.safetensors")
        _check_resume_flags(args, intervention)
    elif (args.kind or "steering") == "steering":
        intervention = SteeringVector.for_model(model, args.layer, hook=args.hook or "resid_post", alpha=alpha)
    else:
        intervention = RankOneAdapter.for_model(model, args.layer, alpha=alpha, seed=args.seed)
    if (args.overwrite and not unfinished) or previous is not None:
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
