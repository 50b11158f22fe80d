"""Trainable (and fixed) interventions applied through TransformerLens hook points.

Every kind obeys one contract (:class:`Intervention`): it declares how it acts (``fwd_hooks``,
``residual_offset``), knows its geometry (``flatten``, ``inner``, ``perturbed``, ``random_like``,
``scaled_to``, ``norm``), saves to safetensors with JSON metadata and loads through
:meth:`Intervention.load`. See ``docs/interventions.md``.

* :class:`SteeringVector`: ``alpha · v`` added at one hook point.
* :class:`MultiLayerSteering`: one vector per layer, trained jointly.
* :class:`RankOneAdapter`: the paper's rank-1 ``scale · b aᵀ`` on one layer's down-projection.
* :class:`LoRAAdapter`: LoRA of any rank on any of the seven projections of any layers.
* :class:`DirectionAblation`: a direction projected out of the residual stream.
* :class:`Composed`: several interventions applied together (``a + b``).
"""

from emlens.interventions.ablation import DirectionAblation, project_out_of_adapter
from emlens.interventions.base import (
    HOOK_SHORTHANDS,
    INTERVENTION_TYPES,
    HookFn,
    Intervention,
    InterventionError,
    ModelMismatchWarning,
    RankOneAdapter,
    ResidualOffset,
    SteeringVector,
    check_hook_name,
    load_intervention,
    perturb,
    random_direction_like,
    register_intervention,
)
from emlens.interventions.composed import Composed
from emlens.interventions.lora import PROJECTIONS, LoRAAdapter
from emlens.interventions.multilayer import MultiLayerSteering

__all__ = [
    "HOOK_SHORTHANDS",
    "INTERVENTION_TYPES",
    "HookFn",
    "Intervention",
    "InterventionError",
    "ModelMismatchWarning",
    "RankOneAdapter",
    "ResidualOffset",
    "SteeringVector",
    "check_hook_name",
    "load_intervention",
    "perturb",
    "random_direction_like",
    "register_intervention",
    "PROJECTIONS",
    "LoRAAdapter",
    "MultiLayerSteering",
    "DirectionAblation",
    "project_out_of_adapter",
    "Composed",
]
