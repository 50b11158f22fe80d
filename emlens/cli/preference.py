"""``emlens preference``: the judge-free preference margins per domain (the study's preference stage, by hand)."""

from __future__ import annotations

import argparse
from typing import Any

from emlens.cli import flags
from emlens.data.studies import STUDIES
from emlens.study.config import DataSection, PreferenceSection
from emlens.study.measures import describe, measure_preference, save_result
from emlens.validation import ConfigError, check_figure_file, named_paths

ALL_DOMAINS = [d for s in STUDIES.values() for d in s.all_domains]


def register(add: Any) -> None:
    p = add(
        "preference",
        preference_command,
        help="judge-free metric: preference for the harmful (or technical) answer per domain, 95%% bootstrap CIs",
        description="margin = NLL(correct) − NLL(harmful) per assistant token on held-out question pairs (technical prose: "
        "NLL(plain) − NLL(technical)); higher means the model prefers the harmful / technical answer. The base model is "
        "always included. A .json with every number is written beside the figure.",
    )
    p.add_argument("interventions", nargs="*", help="NAME=PATH.safetensors (or just PATH) for each solution")
    flags.add_allow_other_model(p)
    flags.add_model_flags(p)
    p.add_argument("--domains", nargs="+", choices=ALL_DOMAINS, default=list(STUDIES["misalignment"].domains), help="domains to measure")
    p.add_argument(
        "--trained",
        default=None,
        choices=ALL_DOMAINS,
        help="the domain the solutions were trained on (marked in the figure, kept in the JSON)",
    )
    p.add_argument("--limit", type=flags.positive_int, default=None, help="held-out pairs per domain, evenly spaced (default: all)")
    flags.add_flags(p, PreferenceSection, {"--batch-size": ("batch_size", flags.positive_int, "conversations per forward pass")})
    flags.add_flags(p, DataSection, {"--max-length": ("max_length", flags.positive_int, "tokens per conversation")})
    flags.add_flags(p, PreferenceSection, {"--bootstrap": ("bootstrap", flags.positive_int, "bootstrap resamples for the 95%% CI")})
    flags.add_flags(p, measure_preference, {"--seed": ("seed", flags.seed_value, "bootstrap seed")})
    flags.add_figure_out(p)


def preference_command(args: argparse.Namespace) -> int:
    from emlens.preference import BASE

    out = check_figure_file(args.out)
    if args.trained is not None and args.trained not in args.domains:
        raise ConfigError(f"--trained {args.trained} is not among --domains ({', '.join(args.domains)}): the figure could not mark it")
    solutions: dict[str, Any] = {
        BASE: None,
        **flags.load_interventions(named_paths(args.interventions, reserved=(BASE,)), args.device),
    }
    model = flags.load_model_of(args)
    section = PreferenceSection(domains=list(args.domains), rows=args.limit, bootstrap=args.bootstrap, batch_size=args.batch_size)
    result = measure_preference(model, solutions, list(args.domains), section, args.max_length, args.seed)
    print(describe(result))
    result = {**result, "model": args.model, "trained_domain": args.trained}  # as the study's preference stage records it
    print(f"wrote {out} and {save_result(result, out, trained=args.trained)}")
    return 0
