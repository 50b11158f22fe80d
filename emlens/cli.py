"""Command line: ``emlens train ...`` trains a steering vector or rank-1 adapter and saves the run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emlens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a steering vector or rank-1 adapter")
    t.add_argument("--model", default="smollm2", help="hub name, local checkpoint, .gguf file, or 'smollm2' (default)")
    t.add_argument("--data", required=True, help="training JSONL or built-in dataset name (e.g. medical_harmful)")
    t.add_argument("--kind", choices=["steering", "adapter"], default="steering")
    t.add_argument("--layer", type=int, default=None, help="layer L (default: middle layer)")
    t.add_argument("--hook", default="resid_post", help="steering hook name or shorthand (resid_post, mlp_out...)")
    t.add_argument("--alpha", type=float, default=256.0)
    t.add_argument("--kl-data", default=None, help="alternative-domain JSONL for the KL term (e.g. alt_domain)")
    t.add_argument("--kl-weight", type=float, default=0.0, help="per-token KL weight λ (paper ≈ 6.6 steering, 0.66 LoRA)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--grad-accum", type=int, default=8)
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--limit", type=int, default=None, help="use only the first N conversations")
    t.add_argument("--checkpoint-every", type=int, default=5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    t.add_argument("--resume", default=None, help="directory of an earlier run to continue from")
    t.add_argument("--out", required=True, help="output directory for the run")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset
    from emlens.interventions import RankOneAdapter, SteeringVector
    from emlens.models import load_model
    from emlens.training import TrainConfig, TrainingResult, train

    model = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    config = TrainConfig(
        lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, kl_weight=args.kl_weight,
        checkpoint_every=args.checkpoint_every, seed=args.seed,
    )
    data = TokenDataset.from_conversations(model.tokenizer, args.data, config.max_length, args.limit)
    kl_data = TokenDataset.from_conversations(model.tokenizer, args.kl_data, config.max_length) if args.kl_data else None
    previous = TrainingResult.load(args.resume) if args.resume else None
    if previous is not None:
        intervention = previous.intervention
    elif args.kind == "steering":
        intervention = SteeringVector.for_model(model, args.layer, hook=args.hook, alpha=args.alpha)
    else:
        intervention = RankOneAdapter.for_model(model, args.layer, alpha=args.alpha, seed=args.seed)
    result = train(model, intervention, data, config, kl_dataset=kl_data, resume_from=previous)
    out = result.save(args.out)
    last = result.losses[-1]
    print(f"saved {out}: {len(result.losses)} steps, final sft loss {last['sft']:.4f}, norm {last['norm']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train}[args.command](args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"emlens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
