"""Interventions in the ecosystem's formats (see ``docs/interventions.md``).

* :mod:`~emlens.formats.reference`: the reference repository's steering-vector ``.pt`` dicts
  (``steering_vector``, ``layer_idx``, ``alpha``, ``d_model``), added at layer L's ``down_proj`` output.
* :mod:`~emlens.formats.peft`: PEFT LoRA adapter folders (``adapter_config.json`` +
  ``adapter_model.safetensors``) for :class:`~emlens.LoRAAdapter` and :class:`~emlens.RankOneAdapter`.
* :mod:`~emlens.formats.llamacpp`: llama.cpp control vectors (GGUF, ``direction.N``) for
  :class:`~emlens.SteeringVector` and :class:`~emlens.MultiLayerSteering`.
"""

from emlens.formats.llamacpp import export_control_vector, import_control_vector, llama_cpp_layer
from emlens.formats.peft import export_peft_adapter, import_peft_adapter
from emlens.formats.reference import export_reference_steering_vector, import_reference_steering_vector

__all__ = [
    "export_control_vector",
    "import_control_vector",
    "llama_cpp_layer",
    "export_peft_adapter",
    "import_peft_adapter",
    "export_reference_steering_vector",
    "import_reference_steering_vector",
]
