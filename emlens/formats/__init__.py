"""Interventions in the ecosystem's formats (see ``docs/interventions.md``).

* :mod:`~emlens.formats.reference`: the reference repository's steering-vector ``.pt`` dicts
  (``steering_vector``, ``layer_idx``, ``alpha``, ``d_model``), added at layer L's ``down_proj`` output.
* :mod:`~emlens.formats.peft`: PEFT LoRA adapter folders (``adapter_config.json`` +
  ``adapter_model.safetensors``) for :class:`~emlens.LoRAAdapter` and :class:`~emlens.RankOneAdapter`.
* :mod:`~emlens.formats.llamacpp`: llama.cpp control vectors (GGUF, ``direction.N``) for
  :class:`~emlens.SteeringVector` and :class:`~emlens.MultiLayerSteering`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emlens.formats.llamacpp import export_control_vector, import_control_vector, llama_cpp_layer
from emlens.formats.peft import export_peft_adapter, import_peft_adapter
from emlens.formats.reference import export_reference_steering_vector, import_reference_steering_vector
from emlens.interventions import Intervention

FORMATS = ("peft", "gguf", "reference")
SUFFIXES = {"peft": "", "gguf": ".gguf", "reference": ".pt"}  # peft writes a folder


def export_intervention(
    intervention: Intervention, fmt: str, out: str | Path, base_model: str | None = None, n_layers: int | None = None
) -> Path:
    """Write ``intervention`` in format ``fmt`` (one of :data:`FORMATS`) to ``out``; returns what was written.

    ``base_model``: the base model's name, recorded in PEFT's ``adapter_config.json`` or as the control vector's
    ``model_hint`` (gguf); ``n_layers``: the model's block count, recorded in a control vector (gguf)."""
    if fmt == "peft":
        return export_peft_adapter(intervention, Path(out), base_model=base_model)
    if fmt == "gguf":
        return export_control_vector(intervention, out, model_hint=base_model, n_layers=n_layers)
    if fmt == "reference":
        return export_reference_steering_vector(intervention, out)
    raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")


def import_intervention(source: str | Path, fmt: str, strength: float = 1.0, model: Any | None = None) -> Intervention:
    """Read ``source`` in format ``fmt`` as an emlens intervention (``strength``: a control vector's scale)."""
    if fmt == "peft":
        return import_peft_adapter(source, model=model)
    if fmt == "gguf":
        return import_control_vector(source, strength=strength, model=model)
    if fmt == "reference":
        return import_reference_steering_vector(source, model=model)
    raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")


__all__ = [
    "FORMATS",
    "export_intervention",
    "import_intervention",
    "export_control_vector",
    "import_control_vector",
    "llama_cpp_layer",
    "export_peft_adapter",
    "import_peft_adapter",
    "export_reference_steering_vector",
    "import_reference_steering_vector",
]
