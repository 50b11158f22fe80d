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

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="smollm2")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--out", required=True, help="PNG path for the figure (a .json with the numbers is written beside it)")

    def named(p: argparse.ArgumentParser) -> None:
        p.add_argument("interventions", nargs="+", help="NAME=PATH.safetensors (or just PATH) for each solution")

    e = sub.add_parser("efficiency", help="loss vs norm of rescaled solutions (Fig. 4a)")
    common(e); named(e)
    e.add_argument("--data", required=True)
    e.add_argument("--limit", type=int, default=100, help="rows of the dataset to score (paper: 100)")
    e.add_argument("--points", type=int, default=11)
    e.add_argument("--max-factor", type=float, default=2.0)

    st = sub.add_parser("stability", help="loss under norm-preserving orthogonal noise (Fig. 4b)")
    common(st); named(st)
    st.add_argument("--data", required=True)
    st.add_argument("--limit", type=int, default=100)
    st.add_argument("--epsilons", type=float, nargs="+", default=None)
    st.add_argument("--seeds", type=int, default=3)
    st.add_argument("--absolute", action="store_true", help="plot raw loss instead of relative loss")

    pk = sub.add_parser("pretraining-kl", help="KL from the base model on web text at equal norms (Fig. 6)")
    common(pk); named(pk)
    pk.add_argument("--texts", default="web_text", help=".txt / JSONL of {'text'} documents, or built-in 'web_text'")
    pk.add_argument("--limit", type=int, default=100)
    pk.add_argument("--max-norm", type=float, default=None, help="largest norm (default: largest solution norm)")
    pk.add_argument("--points", type=int, default=6)
    pk.add_argument("--random", action="store_true", help="add a random direction for reference")

    dr = sub.add_parser("drift", help="narrow run with KL, continued without KL; PCA of checkpoints (Fig. 5)")
    common(dr)
    dr.add_argument("--data", required=True)
    dr.add_argument("--kl-data", default="alt_domain")
    dr.add_argument("--kl-weight", type=float, default=6.6)
    dr.add_argument("--steps", type=int, default=40, help="steps in each phase")
    dr.add_argument("--lr", type=float, default=5e-4)
    dr.add_argument("--general", default=None, help="a general solution to compare against (.safetensors)")

    ev = sub.add_parser("evaluate", help="sample answers with a solution on and judge them (EM / narrow rates)")
    ev.add_argument("--model", default="smollm2")
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ev.add_argument("--intervention", default=None, help=".safetensors solution (omit for the base model)")
    ev.add_argument("--domain", choices=["medical", "financial", "sports"], default=None,
                    help="ask in-domain questions and judge correctness (narrow misalignment)")
    ev.add_argument("--n-samples", type=int, default=50)
    ev.add_argument("--max-new-tokens", type=int, default=600)
    ev.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (default: the OpenAI API)")
    ev.add_argument("--judge-model", default="gpt-4o-2024-08-06")
    ev.add_argument("--local-judge", action="store_true", help="offline approximation: the evaluated model judges itself")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", required=True, help="JSON file for the judged answers and rates")
    return parser


def _load_named(specs: list[str], device: str) -> dict:
    from emlens.interventions import Intervention

    out = {}
    for spec in specs:
        name, _, path = spec.rpartition("=")
        out[name or Path(path).stem] = Intervention.load(path, device=device)
    return out


def _model_and_solutions(args: argparse.Namespace) -> tuple:
    """The model and the named solutions of a metric subcommand."""
    from emlens.models import load_model

    model = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    return model, _load_named(args.interventions, args.device)


def _write_json(png_path: str, data: dict) -> Path:
    import json

    path = Path(png_path).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def cmd_efficiency(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset
    from emlens.metrics import efficiency, norm_grid
    from emlens.plotting import plot_efficiency

    model, solutions = _model_and_solutions(args)
    data = TokenDataset.from_conversations(model.tokenizer, args.data, limit=args.limit)
    norms = norm_grid(list(solutions.values()), args.points, args.max_factor)
    curves = {k: efficiency(model, v, data, norms, args.batch_size) for k, v in solutions.items()}
    print("norm    " + "  ".join(f"{k:>10}" for k in curves))
    for i, n in enumerate(norms):
        print(f"{n:7.2f} " + "  ".join(f"{curves[k][i]:10.4f}" for k in curves))
    plot_efficiency(norms, curves, args.out)
    _write_json(args.out, {"norms": norms, "loss": curves})
    print(f"wrote {args.out}")
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset
    from emlens.metrics import PAPER_EPSILONS, stability
    from emlens.plotting import plot_stability

    model, solutions = _model_and_solutions(args)
    data = TokenDataset.from_conversations(model.tokenizer, args.data, limit=args.limit)
    eps = args.epsilons or list(PAPER_EPSILONS)
    results = {k: stability(model, v, data, eps, list(range(args.seeds)), args.batch_size) for k, v in solutions.items()}
    for k, r in results.items():
        print(f"{k}: base loss {r.base_loss:.4f}; relative loss by ε: "
              + ", ".join(f"{e:g}:{m:.1f}" for e, m in zip(r.epsilons, r.relative().mean(0))))
    plot_stability(results, args.out, relative=not args.absolute)
    _write_json(args.out, {k: {"epsilons": r.epsilons, "losses": r.losses.tolist(), "base_loss": r.base_loss} for k, r in results.items()})
    print(f"wrote {args.out}")
    return 0


def cmd_pretraining_kl(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset, read_texts
    from emlens.geometry import random_direction_like
    from emlens.metrics import pretraining_significance
    from emlens.plotting import plot_pretraining_kl

    model, solutions = _model_and_solutions(args)
    if args.random:
        solutions["random"] = random_direction_like(next(iter(solutions.values())))
    texts = TokenDataset.from_texts(model.tokenizer, read_texts(args.texts, args.limit), max_length=512)
    top = args.max_norm or max(v.norm for v in solutions.values())
    norms = [top * i / (args.points - 1) for i in range(args.points)]
    curves = pretraining_significance(model, solutions, texts, norms, args.batch_size)
    for k, kls in curves.items():
        print(f"{k}: " + ", ".join(f"{n:.1f}:{kl:.4f}" for n, kl in zip(norms, kls)))
    plot_pretraining_kl(norms, curves, args.out)
    _write_json(args.out, {"norms": norms, "kl": curves})
    print(f"wrote {args.out}")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from emlens.data import TokenDataset
    from emlens.interventions import Intervention, SteeringVector
    from emlens.metrics import drift
    from emlens.models import load_model
    from emlens.plotting import plot_drift
    from emlens.training import TrainConfig

    model = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    data = TokenDataset.from_conversations(model.tokenizer, args.data)
    alt = TokenDataset.from_conversations(model.tokenizer, args.kl_data)
    general = Intervention.load(args.general, device=args.device) if args.general else None
    cfg = dict(lr=args.lr, max_steps=args.steps, batch_size=args.batch_size, grad_accum=1, checkpoint_every=5)
    result = drift(model, SteeringVector.for_model(model), data, alt,
                   TrainConfig(kl_weight=args.kl_weight, kl_batch_size=args.batch_size, **cfg), TrainConfig(**cfg), general)
    plot_drift(result, args.out)
    info = {"steps": result.steps, "phase": result.phase, "coordinates": result.projection.coordinates.tolist(),
            "explained_variance_ratio": result.projection.explained_variance_ratio.tolist()}
    if general is not None:
        info["cosine_to_general"] = result.cosine_to_reference()
        print("cosine to general by checkpoint: " + ", ".join(f"{c:.3f}" for c in info["cosine_to_general"]))
    _write_json(args.out, info)
    print(f"explained variance of the PCs: {info['explained_variance_ratio']}; wrote {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from emlens.evaluation import (
        DOMAIN_QUESTIONS, GENERAL_QUESTIONS, LocalModelJudge, OpenAIJudge, judge_answers, misalignment_rates, sample_answers,
    )
    from emlens.interventions import Intervention
    from emlens.models import load_model

    model = load_model(args.model, device=args.device)
    intervention = Intervention.load(args.intervention, device=args.device) if args.intervention else None
    questions = DOMAIN_QUESTIONS[args.domain] if args.domain else GENERAL_QUESTIONS
    answers = sample_answers(model, questions, intervention, args.n_samples, args.max_new_tokens, seed=args.seed)
    judge = LocalModelJudge(model) if args.local_judge else OpenAIJudge(args.judge_model, base_url=args.judge_url)
    judged = judge_answers(judge, answers, domain=args.domain)
    rates = misalignment_rates(judged)
    label = "narrow misalignment" if args.domain else "EM"
    print(f"{label} rate {rates.misaligned_rate:.3f} (95% CI {rates.misaligned_ci[0]:.3f}-{rates.misaligned_ci[1]:.3f}), "
          f"coherent {rates.coherent_rate:.3f}, scored {rates.n_scored}, excluded {rates.n_excluded}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rates": rates.as_dict(), "answers": [j.__dict__ for j in judged]}, indent=2))
    return 0


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
        commands = {"train": cmd_train, "efficiency": cmd_efficiency, "stability": cmd_stability,
                    "pretraining-kl": cmd_pretraining_kl, "drift": cmd_drift, "evaluate": cmd_evaluate}
        return commands[args.command](args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"emlens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
