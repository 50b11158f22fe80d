"""``emlens export`` and ``emlens import``: interventions in the formats the ecosystem uses (see docs/interventions.md)."""

from __future__ import annotations

import argparse
from typing import Any

from emlens.cli.flags import finite_float, positive_int
from emlens.formats import FORMATS
from emlens.validation import ConfigError, check_output_file


def register(add: Any) -> None:
    ex = add(
        "export",
        export_command,
        help="write an emlens intervention as a PEFT adapter folder, a llama.cpp control-vector GGUF, or a reference .pt",
        description="peft: a LoRA / rank-1 adapter as adapter_config.json + adapter_model.safetensors (any LoRA-capable server "
        "loads it). gguf: a steering vector as a llama.cpp control vector (direction.N = block N's output). reference: a "
        "steering vector as the reference repository's .pt dict (added at layer L's down_proj output; a vector at "
        "hook_mlp_out or hook_resid_post is taken as that edit, as on architectures without a post-MLP norm).",
    )
    ex.add_argument("intervention", help="the emlens .safetensors file")
    ex.add_argument("--format", choices=FORMATS, required=True, help="the format to write")
    ex.add_argument("--out", required=True, help="output folder (peft) or file (gguf, reference)")
    ex.add_argument("--base-model", default=None, help="peft: the base model's name to record in adapter_config.json; gguf: the model_hint")
    ex.add_argument("--n-layers", type=positive_int, default=None, help="gguf: the model's layer count (recorded for llama.cpp)")

    im = add(
        "import",
        import_command,
        help="read a PEFT adapter folder, a llama.cpp control-vector GGUF or a reference .pt as an emlens intervention",
    )
    im.add_argument("source", help="PEFT folder, .gguf file or reference .pt file")
    im.add_argument("--format", choices=FORMATS, required=True, help="the format of SOURCE")
    im.add_argument("--strength", type=finite_float, default=None, help="gguf: the control vector's strength (default 1)")
    im.add_argument("--out", required=True, help="the emlens .safetensors file to write")


def export_command(args: argparse.Namespace) -> int:
    from emlens import formats
    from emlens.interventions import Intervention

    _refuse_other_formats_flags(args, {"--base-model": ("peft", "gguf"), "--n-layers": ("gguf",)})
    suffix = formats.SUFFIXES[args.format]
    out = check_output_file(args.out, suffix=suffix) if suffix else args.out
    written = formats.export_intervention(Intervention.load(args.intervention), args.format, out, args.base_model, args.n_layers)
    print(f"wrote {written}")
    return 0


def import_command(args: argparse.Namespace) -> int:
    from emlens import formats

    _refuse_other_formats_flags(args, {"--strength": ("gguf",)})
    out = check_output_file(args.out, suffix=".safetensors")
    strength = 1.0 if args.strength is None else args.strength
    intervention = formats.import_intervention(args.source, args.format, strength=strength)
    print(f"wrote {intervention.save(out)}: {intervention!r}")
    if args.format == "reference":  # no model here: the site is the one of architectures without a post-MLP norm
        print(
            "note: placed at hook_mlp_out, which equals the reference's down_proj output on Llama, Qwen2/3 and Mistral; "
            "on Gemma-2/3 (a norm after the MLP) import it in Python with the model, "
            "emlens.formats.import_reference_steering_vector(path, model), which places it at mlp.out.hook_out"
        )
    return 0


def _refuse_other_formats_flags(args: argparse.Namespace, applies: dict[str, tuple[str, ...]]) -> None:
    """A flag given for a format it does not apply to would be ignored without a word: refused, naming its formats."""
    for flag, fmts in applies.items():
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None and args.format not in fmts:
            raise ConfigError(f"{flag} applies to --format {' or '.join(fmts)}, not {args.format}; leave it out")
