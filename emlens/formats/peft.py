"""PEFT LoRA adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

Written and read without importing ``peft`` (tests round-trip them through the real package).
Tensor names are peft's: ``base_model.model.model.layers.{L}.{self_attn|mlp}.{q|k|v|o|gate|up|down}_proj.lora_{A|B}.weight``,
``lora_A`` of shape ``r × d_in`` and ``lora_B`` of shape ``d_out × r`` (the same tensors as
:class:`~emlens.LoRAAdapter`'s ``A`` and ``B``). The config names the adapted projections
(``target_modules``) and layers (``layers_to_transform``), ``r``, ``lora_alpha`` and ``use_rslora``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from emlens.interventions import Composed, Intervention, InterventionError, LoRAAdapter, RankOneAdapter
from emlens.interventions.lora import PROJECTIONS, site_key

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# a decoder layer of the language model: peft's prefix, then transformers' paths to the text layers (a multimodal
# model's vision or audio tower also has "layers.N.self_attn...", which must not land in the text layers)
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+?)"
    r"\.lora_([AB])(?:\.default)?\.weight$"
)
# adapter_config.json fields that do not change what the adapter computes at inference, or that import_peft_adapter
# reads or checks itself; any other field must hold its inert default (None, False, an empty list or dict), else the
# adapter does something emlens would not reproduce (aLoRA's invocation tokens, layer replication, DoRA, ...)
_INERT_FIELDS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "r", "lora_alpha", "use_rslora", "target_modules",
    "layers_to_transform", "layers_pattern", "lora_dropout", "inference_mode", "rank_pattern", "alpha_pattern",
    "auto_mapping", "exclude_modules", "peft_version", "megatron_core", "qalora_group_size", "runtime_config",
    "init_lora_weights", "bias", "loftq_config", "fan_in_fan_out", "use_dora", "modules_to_save",
}  # fmt: skip
# initialisations that leave the base model changed (the adapter is relative to a residual model) unless converted
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_MODULE_TO_SHORT = {module.split(".")[-1]: short for short, (_, module) in PROJECTIONS.items()}

PEFT_DEFAULT_RANK = 8  # peft.LoraConfig's defaults for ``r`` and ``lora_alpha``
PEFT_DEFAULT_ALPHA = 8.0


def peft_key(layer: int, proj: str, factor: str) -> str:
    """peft's saved tensor name for one factor (``"A"`` or ``"B"``) of one module."""
    return f"base_model.model.model.layers.{layer}.{PROJECTIONS[proj][1]}.lora_{factor}.weight"


def export_peft_adapter(adapter: Intervention, directory: str | Path, base_model: str | None = None) -> Path:
    """Write a :class:`LoRAAdapter` (or :class:`RankOneAdapter`) as a PEFT LoRA folder; returns the folder.

    Load it with ``PeftModel.from_pretrained(model, directory)`` (or vLLM, llama.cpp's converter...).
    ``base_model`` defaults to the adapter's model name.
    """
    if isinstance(adapter, RankOneAdapter):
        if not adapter.out_hook.endswith("mlp.out.hook_out") or not adapter.in_hook.endswith("mlp.out.hook_in"):
            raise InterventionError("only a RankOneAdapter on the down-projection's own hooks (mlp.out.hook_in/out) has a peft form")
        adapter = LoRAAdapter.from_rank_one(adapter)
    if not isinstance(adapter, LoRAAdapter):
        raise InterventionError(f"only LoRA adapters have a PEFT form, not a {adapter.kind}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer, proj in adapter.sites():
        a, b = adapter.factors(layer, proj)
        tensors[peft_key(layer, proj, "A")] = a.detach().float().cpu().contiguous()
        tensors[peft_key(layer, proj, "B")] = b.detach().float().cpu().contiguous()
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or adapter.model_name,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.rslora,
        "target_modules": [PROJECTIONS[p][1].split(".")[-1] for p in adapter.projections],
        "layers_to_transform": list(adapter.layers),
        "layers_pattern": None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def import_peft_adapter(directory: str | Path, model: Any | None = None) -> Intervention:
    """Read a PEFT LoRA folder as a :class:`LoRAAdapter` (or a :class:`Composed` of them when layers adapt
    different projections). Rank and alpha come from the config (``rank_pattern`` / ``alpha_pattern``
    honoured per module); ``lora_dropout`` only acts in training and is ignored. With ``model`` the
    result is checked against it."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for needed in (config_path, weights_path):
        if not needed.exists():
            raise FileNotFoundError(f"{directory} is not a PEFT adapter folder: {needed.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise InterventionError(f"{config_path} is not valid JSON ({err.msg})") from err
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InterventionError(f"{directory} holds a {config.get('peft_type')!r} adapter; only LoRA is supported")
    for flag, allowed in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(config.get(flag, False)) != allowed:
            raise InterventionError(f"{directory}: {flag}={config.get(flag)} is not supported")
    if config.get("bias", "none") != "none":
        raise InterventionError(f"{directory}: LoRA biases (bias={config.get('bias')!r}) are not supported")
    if config.get("modules_to_save"):
        raise InterventionError(f"{directory}: fully trained modules (modules_to_save) are not a LoRA; not supported")
    active = sorted(k for k, v in config.items() if k not in _INERT_FIELDS and v not in (None, False, [], {}, "", 0))
    if active:
        raise InterventionError(
            f"{directory}: adapter_config.json sets {', '.join(f'{k}={config[k]!r}' for k in active)}, which change what the "
            "adapter computes in ways emlens does not reproduce; not supported"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise InterventionError(
            f"{directory}: init_lora_weights={init!r} adapters apply to a changed base model unless converted "
            "(peft's path_initial_model_for_weight_conversion); save the converted adapter"
        )
    state = load_file(str(weights_path))
    factors: dict[tuple[int, str], dict[str, Tensor]] = defaultdict(dict)
    seen: dict[tuple[int, str, str], str] = {}
    for key, tensor in state.items():
        found = _KEY.search(key)
        if found is None or found.group(3) not in _MODULE_TO_SHORT:
            raise InterventionError(
                f"{weights_path}: tensor {key!r} is not a LoRA factor of a decoder projection of the language model's layers"
            )
        site = (int(found.group(1)), _MODULE_TO_SHORT[found.group(3)], found.group(4))
        if site in seen:
            raise InterventionError(f"{weights_path}: tensors {seen[site]!r} and {key!r} are both lora_{site[2]} of layer {site[0]}")
        seen[site] = key
        factors[(site[0], site[1])][site[2]] = tensor
    if not factors:
        raise InterventionError(f"{weights_path} holds no LoRA factors")
    rslora = bool(config.get("use_rslora", False))
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    by_layer: dict[int, dict[str, tuple[int, float, tuple[int, int]]]] = defaultdict(dict)
    for (layer, proj), pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise InterventionError(f"{weights_path}: layer {layer} {proj}_proj has lora_{'A' if 'A' not in pair else 'B'} missing")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InterventionError(f"{weights_path}: layer {layer} {proj}_proj has factors of shapes {tuple(a.shape)}, {tuple(b.shape)}")
        name = f"model.layers.{layer}.{PROJECTIONS[proj][1]}"
        # a key the config leaves out takes peft's own LoraConfig default (r = 8, lora_alpha = 8), as peft loads it
        rank = int(_pattern(config.get("rank_pattern") or {}, name, config.get("r", PEFT_DEFAULT_RANK)))
        alpha = float(_pattern(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", PEFT_DEFAULT_ALPHA)))
        if rank != a.shape[0]:
            raise InterventionError(f"{weights_path}: layer {layer} {proj}_proj has rank {a.shape[0]} but the config says {rank}")
        by_layer[layer][proj] = (rank, alpha, (int(a.shape[1]), int(b.shape[0])))
    for layer, projs in by_layer.items():
        groups[tuple(sorted((p, v) for p, v in projs.items()))].append(layer)
    parts = []
    for signature, layers in groups.items():
        projs = dict(signature)
        settings = {(rank, alpha) for rank, alpha, _ in projs.values()}
        for rank, alpha in sorted(settings):  # modules of one rank and alpha form one adapter
            chosen = {p: v for p, v in projs.items() if (v[0], v[1]) == (rank, alpha)}
            lora = LoRAAdapter({p: v[2] for p, v in chosen.items()}, layers, rank, alpha, rslora, seed=None)
            lora.model_name = config.get("base_model_name_or_path")
            with torch.no_grad():
                for layer in layers:
                    for proj in chosen:
                        key = site_key(layer, proj)
                        lora.A[key].copy_(factors[(layer, proj)]["A"])
                        lora.B[key].copy_(factors[(layer, proj)]["B"])
            parts.append(lora)
    result: Intervention = parts[0] if len(parts) == 1 else Composed(parts)
    if model is not None:
        result.check_model(model, allow_other_model=True)
    return result


def _pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the module name's end (as regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
