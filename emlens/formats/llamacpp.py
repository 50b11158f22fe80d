"""llama.cpp control vectors: steering vectors as GGUF files (``--control-vector FILE``).

A control-vector GGUF (architecture ``controlvector``) holds one float32 tensor ``direction.k``
per layer. llama.cpp adds it to block ``k``'s output (``l_out``, after the block's last residual
addition) at every position, prompt included, scaled by ``--control-vector-scaled FILE S`` (1 by
default); ``k = 0`` is refused by its loader, so block 0's output cannot be steered.

emlens → llama.cpp: a vector at ``blocks.L.hook_resid_post`` or ``blocks.L.hook_mlp_out`` (the
last addition to the residual in block L, after Gemma's post-norm too) is ``direction.L``; one at
``blocks.L.hook_resid_pre`` (L ≥ 1) is ``direction.{L-1}``. The effective vector ``alpha · v`` is
written; vectors landing on the same block are summed. Import gives a
:class:`~emlens.MultiLayerSteering` at ``hook_resid_post`` with ``alpha = 1``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emlens.interventions import Composed, Intervention, InterventionError, MultiLayerSteering, SteeringVector
from emlens.validation import with_file_suffix

ARCH = "controlvector"
_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_mlp_out|hook_resid_pre)$")


def llama_cpp_layer(hook: str, model: Any | None = None) -> int:
    """The llama.cpp block ``k`` (tensor ``direction.k``) where adding a vector equals adding it at ``hook``.

    ``hook_mlp_out`` is block ``L``'s output only where the MLP's output is the last thing added to the residual:
    on every architecture emlens proves (Gemma's post-norm included), not necessarily on others. Given the
    ``model`` the vector was trained on, that is checked (an unproved architecture is refused); without one, a
    ``hook_mlp_out`` vector is exported with a warning saying so.
    """
    found = _HOOK.match(hook)
    if found is None:
        raise InterventionError(
            f"{hook} is not a residual-stream site llama.cpp can steer (it adds control vectors to block outputs: "
            "use hook_resid_post, hook_mlp_out or hook_resid_pre)"
        )
    layer = int(found.group(1)) - (1 if found.group(2) == "hook_resid_pre" else 0)
    if layer < 1:
        raise InterventionError(f"{hook} is block {layer}'s output or earlier; llama.cpp control vectors start at block 1")
    if found.group(2) == "hook_mlp_out":
        _check_mlp_out_is_block_output(hook, model)
    return layer


def _check_mlp_out_is_block_output(hook: str, model: Any | None) -> None:
    from emlens.runner.architectures import PROVED_MODEL_TYPES, Architecture

    config = getattr(getattr(model, "original_model", model), "config", None)
    if config is None:
        warnings.warn(
            f"{hook} is exported as its block's output, which it is on the architectures emlens proves "
            f"({', '.join(PROVED_MODEL_TYPES)}); on another architecture the MLP's output may not be the last thing "
            "added to the residual: pass the model (model=...) to check",
            stacklevel=4,
        )
        return
    if Architecture.of(config).residual_layer(hook) is None:
        raise InterventionError(
            f"{hook}: on this model ({getattr(config, 'model_type', '?')}, not among the architectures emlens proves: "
            f"{', '.join(PROVED_MODEL_TYPES)}) adding at the MLP's output is not known to equal adding to the block's "
            "output, which is all llama.cpp steers; train the vector at hook_resid_post instead"
        )


def control_vectors(intervention: Intervention, model: Any | None = None) -> dict[int, torch.Tensor]:
    """``{llama.cpp block k: effective vector}`` of a steering vector, multi-layer steering, or a sum of them
    (``model``: the model it was trained on, to check ``hook_mlp_out`` sites; see :func:`llama_cpp_layer`)."""
    parts = intervention.members() if isinstance(intervention, Composed) else [intervention]
    out: dict[int, torch.Tensor] = {}
    for part in parts:
        if isinstance(part, SteeringVector):
            if part.positions != "all":
                raise InterventionError("llama.cpp steers every position; this steering vector steers only some")
            pairs = [(part.hook, part.effective.detach())]
        elif isinstance(part, MultiLayerSteering):
            pairs = list(zip(part.hooks, part.effective.detach()))
        else:
            raise InterventionError(f"a {part.kind} has no llama.cpp control-vector form (only steering vectors do)")
        for hook, vector in pairs:
            k = llama_cpp_layer(hook, model)
            vector = vector.float().cpu()
            out[k] = out[k] + vector if k in out else vector.clone()
    return dict(sorted(out.items()))


def export_control_vector(
    intervention: Intervention, path: str | Path, model_hint: str | None = None, n_layers: int | None = None, model: Any | None = None
) -> Path:
    """Write a llama.cpp control-vector GGUF (``direction.k`` tensors, float32).

    ``model``: the model the vector was trained on; it checks that a ``hook_mlp_out`` site is its block's output
    (:func:`llama_cpp_layer`).

    ``model_hint`` (default: the intervention's model name) and ``n_layers`` (the model's block count;
    default: the highest block steered + 1) fill ``controlvector.model_hint`` / ``controlvector.layer_count``,
    which llama.cpp does not read.
    """
    import gguf

    vectors = control_vectors(intervention, model)
    path = with_file_suffix(path, ".gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_string(f"{ARCH}.model_hint", model_hint or intervention.model_name or "")
    writer.add_uint32(f"{ARCH}.layer_count", int(n_layers if n_layers is not None else max(vectors) + 1))
    for k, vector in vectors.items():
        writer.add_tensor(f"direction.{k}", vector.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_control_vector(path: str | Path) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """``({k: vector}, {metadata key: value})`` of a control-vector GGUF, with llama.cpp's loader's checks."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no control vector at {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise InterventionError(f"{path} is not a readable GGUF file: {err}") from err
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith(f"{ARCH}.") or name == "general.architecture":
            meta[name] = field.contents()
    vectors: dict[int, torch.Tensor] = {}
    width = None
    for tensor in reader.tensors:
        found = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if found is None or int(found.group(1)) == 0:
            raise InterventionError(f"{path}: tensor {tensor.name!r} is not a direction.k (k >= 1) tensor")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise InterventionError(f"{path}: {tensor.name} must be a 1-D float32 tensor")
        data = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).flatten()
        if width is not None and data.numel() != width:
            raise InterventionError(f"{path}: direction tensors of different widths")
        width = data.numel()
        k = int(found.group(1))
        vectors[k] = vectors[k] + data if k in vectors else data  # llama.cpp sums repeated k
    if not vectors:
        raise InterventionError(f"{path} holds no direction tensors")
    return dict(sorted(vectors.items())), meta


def import_control_vector(path: str | Path, strength: float = 1.0, model: Any | None = None) -> MultiLayerSteering:
    """A llama.cpp control vector (times ``strength``) as a :class:`MultiLayerSteering` at ``hook_resid_post``."""
    vectors, meta = read_control_vector(path)
    hint = meta.get(f"{ARCH}.model_hint") or None
    steering = MultiLayerSteering.from_vectors({k: v * float(strength) for k, v in vectors.items()}, 1.0, model_name=hint)
    if model is not None:
        steering.check_model(model, allow_other_model=True)
    return steering
