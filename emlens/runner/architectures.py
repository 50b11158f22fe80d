"""What emlens knows about each transformers architecture, stated once.

An architecture is *proved* when the parity suite (``tests/test_parity.py``) checks, in float32
on tiny random models, that the fast path equals the hooked TransformerLens path and plain
transformers with the same edit made by a PyTorch hook or weight surgery. Only proved
architectures take the fast path; every other model runs the plain hooked path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Decoder layers: pre-norm, rotary positions, one residual stream; covered by the parity suite.
PROVED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")
# Architectures that normalise the MLP output before adding it to the residual stream: there
# TransformerLens' ``hook_mlp_out`` is the output of that norm (what the residual receives).
_POST_MLP_NORM = {"gemma2": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm"}
# Architectures whose blocks run padding-free (full causal attention, Llama calling convention).
_PACKABLE = ("llama", "qwen2", "qwen3", "mistral")

# TransformerLens compatibility-mode hook names → (module path inside decoder layer i, where).
# "output": the module's output; "input": its first positional input. "" is the layer itself.
_SITES = {
    "hook_resid_pre": ("", "input"),
    "hook_resid_post": ("", "output"),
    "hook_mlp_out": ("{mlp_out}", "output"),
}
# The seven projections: TransformerLens component → transformers module. Their hook_in / hook_out
# are the projection's input and output (TransformerLens shows q/k/v's output and o's input split
# into heads, [..., n_heads, d_head]; the plain module sees them flat; a hook must accept both).
PROJECTION_MODULES = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.in": "mlp.up_proj",
    "mlp.out": "mlp.down_proj",
}
for _component, _module in PROJECTION_MODULES.items():
    _SITES[f"{_component}.hook_in"] = (_module, "input")
    _SITES[f"{_component}.hook_out"] = (_module, "output")
_HOOK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Site:
    """Where a hook point lives in the plain transformers model: layer, module path, input or output."""

    layer: int
    module: str
    where: str


@dataclass(frozen=True)
class Architecture:
    """The quirks of one transformers architecture that the runner needs."""

    model_type: str
    proved: bool
    packable: bool
    mlp_out_module: str
    final_logit_softcap: float | None
    n_layers: int

    @classmethod
    def of(cls, config: Any) -> Architecture:
        model_type = getattr(config, "model_type", "") or ""
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        full_attention = all(t == "full_attention" for t in layer_types) and not (
            getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None)
        )
        attn = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
        return cls(
            model_type=model_type,
            proved=model_type in PROVED_MODEL_TYPES,
            packable=model_type in _PACKABLE and full_attention and (attn in ("sdpa", "eager") or attn.startswith("emlens_packed")),
            mlp_out_module=_POST_MLP_NORM.get(model_type, "mlp"),
            final_logit_softcap=getattr(config, "final_logit_softcapping", None) or None,
            n_layers=int(config.num_hidden_layers),
        )

    def site(self, hook_name: str) -> Site | None:
        """The plain-module site of a TransformerLens hook name, or None when it has none here."""
        match = _HOOK_NAME.match(hook_name)
        if match is None or not self.proved:
            return None
        layer, rest = int(match.group(1)), match.group(2)
        found = _SITES.get(rest)
        if found is None or not 0 <= layer < self.n_layers:
            return None
        if rest == "hook_resid_pre":
            if layer > 0:  # the same tensor as block L-1's output, where an edit survives on every path
                return Site(layer - 1, "", "output")
            if not self.packable:
                # block 0's input: the padded upper pass (Runner.hidden) feeds the cached residual to the
                # first block by a pre-hook registered after the site's, which would overwrite the edit
                return None
        return Site(layer, found[0].format(mlp_out=self.mlp_out_module), found[1])

    def residual_layer(self, hook_name: str) -> int | None:
        """``L`` when adding a vector at ``hook_name`` is the same as adding it to the residual after block ``L``."""
        match = _HOOK_NAME.match(hook_name)
        if match is None:
            return None
        layer, rest = int(match.group(1)), match.group(2)
        # hook_mlp_out is the last thing added to the residual in block L, on every proved architecture
        if rest == "hook_resid_post" or (rest == "hook_mlp_out" and self.proved):
            return layer
        if rest == "hook_resid_pre" and layer > 0:
            return layer - 1
        return None
