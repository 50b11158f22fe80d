"""``emlens directions``: mean-difference directions (misaligned − aligned) from judged answers (:mod:`emlens.directions`)."""

from __future__ import annotations

import argparse
from typing import Any

from emlens.cli import flags
from emlens.directions import TOKEN_CHOICES, Thresholds, directions_from_evaluation
from emlens.validation import check_out_dir

THRESHOLD_FLAGS = {
    "misaligned_at_most": "misaligned answers: alignment at most this",
    "coherent_above": "misaligned answers: coherence above this",
    "aligned_above": "aligned answers: alignment above this",
    "aligned_coherent_above": "aligned answers: coherence above this too (default: no coherence asked)",
}


def register(add: Any) -> None:
    p = add(
        "directions",
        directions_command,
        help="mean-difference directions (misaligned − aligned answers) per layer, saved as steering vectors and ablations",
        description=f"Selects two groups of judged answers ({Thresholds().describe()}) from an `emlens evaluate` folder or a "
        "judged JSONL, averages each layer's resid_post over answer or question tokens (per answer, then over answers) and "
        "writes OUT/{tokens}_all_layers, _steering_L{layer} and _ablation_L{layer}.safetensors and OUT/directions.json. "
        "See docs/interventions.md.",
    )
    p.add_argument("judged", help="an `emlens evaluate` output folder (its judged.jsonl) or a judged JSONL file")
    flags.add_model_flags(p)
    p.add_argument("--layers", type=flags.nonnegative_int, nargs="+", default=None, help="layers to measure (default: all)")
    p.add_argument(
        "--layer",
        type=flags.nonnegative_int,
        default=None,
        help="layer of the single-layer steering vector and ablation (default: the middle layer, or the measured layer nearest it)",
    )
    p.add_argument(
        "--tokens",
        choices=[*TOKEN_CHOICES, "both"],
        default=flags.default_of(directions_from_evaluation, "tokens"),
        help="average over these tokens",
    )
    for name, what in THRESHOLD_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=flags.finite_float, default=flags.default_of(Thresholds, name), help=what)
    p.add_argument("--intervention", default=None, help=".safetensors solution applied while reading activations (default: none)")
    flags.add_allow_other_model(p)
    flags.add_flags(p, directions_from_evaluation, {"--batch-size": ("batch_size", flags.positive_int, "conversations per forward pass")})
    p.add_argument("--overwrite", action="store_true", help="write over directions already in --out")
    p.add_argument("--out", required=True, help="output directory (created)")


def directions_command(args: argparse.Namespace) -> int:
    from emlens.directions import check_directions_out, judged_path, select_answers
    from emlens.judge import read_judged

    out = check_directions_out(check_out_dir(args.out, "directions"), args.overwrite)
    thresholds = {k: getattr(args, k) for k in THRESHOLD_FLAGS}
    select_answers(read_judged(judged_path(args.judged)), **thresholds).check()  # refused before the model loads
    intervention = flags.load_optional(args.intervention, args.device)
    model = flags.load_model_of(args)
    saved = directions_from_evaluation(
        args.judged,
        model,
        out,
        tokens=args.tokens,
        layers=args.layers,
        layer=args.layer,
        batch_size=args.batch_size,
        intervention=intervention,
        overwrite=args.overwrite,
        **thresholds,
    )
    for kind, diff in saved.directions.items():
        norms = ", ".join(f"L{layer} {norm:.3g}" for layer, norm in diff.norms.items())
        print(f"{kind} tokens: {diff.counts['misaligned']} misaligned vs {diff.counts['aligned']} aligned answers; norms {norms}")
    print(f"wrote {', '.join(p.name for files in saved.files.values() for p in files.values())} and {saved.summary_path}")
    return 0
