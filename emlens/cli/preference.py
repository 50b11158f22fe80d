"""``emlens preference``: the judge-free preference margins per domain (the study's preference stage, by hand)."""

from __future__ import annotations

import argparse
from typing import Any

from emlens.cli.flags import (
    add_allow_other_model,
    add_figure_out,
    add_model_flags,
    default_of,
    load_interventions,
    load_model_of,
    named_specs,
    positive_int,
    seed_value,
)
from emlens.data.studies import STUDIES
from emlens.study.config import DataSection, PreferenceSection
from emlens.validation import check_output_file

ALL_DOMAINS = [d for s in STUDIES.values() for d in s.all_domains]


def register(add: Any) -> None:
    p = add(
        "preference",
        preference_command,
        help="judge-free metric: preference for the harmful (or technical) answer per domain, 95% bootstrap CIs",
        description="margin = NLL(correct) − NLL(harmful) per assistant token on held-out question pairs (technical prose: "
        "NLL(plain) − NLL(technical)); higher means the model prefers the harmful / technical answer. The base model is "
        "always included. A .json with every number is written beside the figure.",
    )
    p.add_argument("interventions", nargs="*", help="NAME=PATH.safetensors (or just PATH) for each solution")
    add_allow_other_model(p)
    add_model_flags(p)
    p.add_argument("--domains", nargs="+", choices=ALL_DOMAINS, default=list(STUDIES["misalignment"].domains), help="domains to measure")
    p.add_argument("--trained", default=None, help="the domain the solutions were trained on (marked in the figure)")
    p.add_argument("--limit", type=positive_int, default=None, help="held-out pairs per domain, evenly spaced (default: all)")
    p.add_argument(
        "--batch-size", type=positive_int, default=default_of(PreferenceSection, "batch_size"), help="conversations per forward pass"
    )
    p.add_argument("--max-length", type=positive_int, default=default_of(DataSection, "max_length"), help="tokens per conversation")
    p.add_argument(
        "--bootstrap", type=positive_int, default=default_of(PreferenceSection, "bootstrap"), help="bootstrap resamples for the 95%% CI"
    )
    p.add_argument("--seed", type=seed_value, default=0, help="bootstrap seed")
    add_figure_out(p)


def preference_command(args: argparse.Namespace) -> int:
    from emlens.preference import BASE
    from emlens.study.measures import describe, measure_preference, save_result

    out = check_output_file(args.out, suffix=".png")
    solutions: dict[str, Any] = {BASE: None, **load_interventions(named_specs(args.interventions, reserved=(BASE,)), args.device)}
    model = load_model_of(args)
    section = PreferenceSection(domains=list(args.domains), rows=args.limit, bootstrap=args.bootstrap, batch_size=args.batch_size)
    result = measure_preference(model, solutions, list(args.domains), section, args.max_length, args.seed)
    print(describe(result))
    print(f"wrote {out} and {save_result({**result, 'model': args.model}, out, trained=args.trained)}")
    return 0
