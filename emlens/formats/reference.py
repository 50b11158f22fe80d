"""The reference repository's steering vectors: ``steering_vector.pt`` dicts.

The paper's code (``em_organism_dir/finetune/steering_vector_toggle``) trains ``v`` with a forward
hook on ``model.model.layers[L].mlp.down_proj`` that adds ``alpha · v`` to its output, and saves
``torch.save({"steering_vector": v, "layer_idx": L, "d_model": d, "alpha": alpha, ...})``.

Site mapping: the output of layer L's ``down_proj`` is TransformerLens' ``blocks.L.mlp.out.hook_out``
on every architecture. Where the MLP output is added to the residual as it is (Llama, Qwen2/3,
Mistral: no post-feedforward norm), that is also ``blocks.L.hook_mlp_out``, which emlens runs on
its fastest path (the vector added to cached residuals), so the import uses ``hook_mlp_out`` there
and ``mlp.out.hook_out`` on Gemma-2/3 (whose post-feedforward norm sits between the two). Without
a model, ``hook_mlp_out`` is assumed (the reference repository's models are Qwen and Llama).

One difference on purpose: the reference hook edits ``output[0]``, i.e. only the first element
of a batch, in training and in its sampler (which runs batches of 8, so only every eighth answer is
steered); emlens steers every element (the two agree only at batch size 1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from emlens.interventions import Intervention, InterventionError, SteeringVector

FILE_NAME = "steering_vector.pt"


def _has_post_mlp_norm(model: Any) -> bool:
    from emlens.runner.architectures import Architecture

    config = getattr(getattr(model, "original_model", None), "config", None)
    return config is not None and Architecture.of(config).mlp_out_module != "mlp"


def down_proj_hook(layer: int, model: Any | None = None) -> str:
    """The hook name for "added to layer ``layer``'s down_proj output" on ``model`` (see the module docstring)."""
    if model is not None and _has_post_mlp_norm(model):
        return f"blocks.{layer}.mlp.out.hook_out"
    return f"blocks.{layer}.hook_mlp_out"


def import_reference_steering_vector(path: str | Path, model: Any | None = None) -> SteeringVector:
    """Read a reference ``steering_vector.pt`` (or a folder holding one) as a :class:`SteeringVector`.

    ``alpha`` and ``v`` are kept apart as in the reference (``effective = alpha · v``). Give the
    ``model`` it will run on to get the exact site on architectures with a post-MLP norm.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.exists():
        raise FileNotFoundError(f"no reference steering vector at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds here (pickle, zip, runtime)
        raise InterventionError(f"{path} is not a readable torch file: {err}") from err
    if not isinstance(data, dict) or "steering_vector" not in data or "layer_idx" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InterventionError(f"{path} is not a reference steering vector (needs 'steering_vector' and 'layer_idx'; found {keys})")
    vector = torch.as_tensor(data["steering_vector"]).detach().float().flatten()
    layer = int(data["layer_idx"])
    alpha = float(data.get("alpha", 1.0))
    if not math.isfinite(alpha) or alpha == 0:
        raise InterventionError(f"{path}: alpha must be a finite non-zero number, got {alpha}")
    d_model = int(data.get("d_model", vector.numel()))
    if d_model != vector.numel():
        raise InterventionError(f"{path}: d_model is {d_model} but the vector has {vector.numel()} values")
    name = getattr(getattr(model, "cfg", None), "model_name", None) if model is not None else None
    steering = SteeringVector(layer, d_model, hook=down_proj_hook(layer, model), alpha=alpha, init=vector, model_name=name)
    if model is not None:
        steering.check_model(model, allow_other_model=True)
    return steering


def export_reference_steering_vector(vector: Intervention, path: str | Path, model: Any | None = None) -> Path:
    """Write ``vector`` as a reference ``steering_vector.pt`` (``path``: a file, or a folder to hold one).

    The vector must act at layer L's down_proj output: ``blocks.L.mlp.out.hook_out`` always, or
    ``hook_mlp_out`` / ``hook_resid_post`` (the same edit: the last addition to the residual in the
    block) on architectures without a post-MLP norm (assumed when ``model`` is not given).
    """
    if not isinstance(vector, SteeringVector):
        raise InterventionError(f"only a SteeringVector has the reference format, not a {vector.kind}")
    if vector.positions != "all":
        raise InterventionError("the reference steers every position; this vector steers only some")
    layer = vector.layer
    exact = vector.hook == f"blocks.{layer}.mlp.out.hook_out"
    residual = vector.hook in (f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.hook_resid_post")
    if residual and model is None and "gemma" in (vector.model_name or "").lower():
        raise InterventionError(
            f"the vector was made for {vector.model_name}, whose MLP output passes a post-norm before the residual: "
            f"{vector.hook} is not layer {layer}'s down_proj output there; pass the model (model=...) to check, or "
            f"export a vector at blocks.{layer}.mlp.out.hook_out"
        )
    if not (exact or (residual and not (model is not None and _has_post_mlp_norm(model)))):
        raise InterventionError(
            f"a vector at {vector.hook} is not an edit of layer {layer}'s down_proj output on this model "
            f"(use blocks.{layer}.mlp.out.hook_out{', or hook_mlp_out where the MLP has no post-norm' if not exact else ''})"
        )
    path = Path(path)
    if path.suffix != ".pt":
        path = path / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "steering_vector": vector.vector.detach().float().cpu().clone(),
        "layer_idx": layer,
        "d_model": vector.d_model,
        "alpha": vector.alpha,
        "approach": "emlens",
    }
    torch.save(payload, path)
    return path
