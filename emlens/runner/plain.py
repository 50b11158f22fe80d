"""The transformers model under TransformerLens' wrappers, and plain PyTorch hooks at hook-point sites.

:func:`unwrap` gives a shallow copy of a bridged module tree in which every bridge wrapper is
replaced by the transformers module it wraps. Weights are shared (nothing is copied), no
TransformerLens hook point fires, and transformers' own code (its KV cache included) runs
unchanged. :func:`site_hooks` applies an intervention's hook functions at the same sites as
PyTorch forward hooks on those plain modules.
"""

from __future__ import annotations

import copy
import functools
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from emlens.runner.architectures import Architecture, Site

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _contains_bridge(module: nn.Module) -> bool:
    return any("_original_component" in m._modules for m in module.modules())


def unwrap(module: nn.Module) -> nn.Module:
    """The transformers module under TransformerLens' bridge wrappers, sharing its weights (no copy)."""
    original = module._modules.get("_original_component")
    if original is not None:
        return unwrap(original)
    if not _contains_bridge(module):
        return module
    clone = copy.copy(module)
    clone._modules = OrderedDict((k, unwrap(v) if v is not None else None) for k, v in module._modules.items())
    for name in _HOOK_DICTS:
        if hasattr(module, name):
            setattr(clone, name, OrderedDict())
    _rebind_dispatch_hook(module, clone)
    return clone


def _rebind_dispatch_hook(module: nn.Module, clone: nn.Module) -> None:
    """Point a device-map (accelerate) forward wrapper at the clone: as copied, it would run the original module."""
    wrapper = module.__dict__.get("forward")
    if isinstance(wrapper, functools.partial) and wrapper.args and wrapper.args[0] is module:
        clone.forward = functools.partial(wrapper.func, clone, *wrapper.args[1:], **(wrapper.keywords or {}))
    if "_old_forward" in module.__dict__:
        clone._old_forward = types.MethodType(type(module).forward, clone)  # type: ignore[method-assign,assignment]


def decoder_stack(hf_model: Any) -> Any:
    """The decoder (embeddings, ``layers`` ModuleList, final norm) of a transformers causal LM."""
    decoder = hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else getattr(hf_model, "model", None)
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise NotImplementedError(f"{type(hf_model).__name__}: no decoder layer stack found")
    return decoder


def site_module(plain_model: Any, site: Site) -> nn.Module:
    """The plain module at ``site`` (a decoder layer or one of its submodules)."""
    module: nn.Module = decoder_stack(plain_model).layers[site.layer]
    for part in filter(None, site.module.split(".")):
        module = getattr(module, part)
    return module


HookFn = Callable[[Tensor, Any], "Tensor | None"]


def _output_hook(fn: HookFn) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) else output
        new = fn(first, None)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def _input_hook(fn: HookFn) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            new = fn(args[0], None)
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"], None)
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _runs_after_previous_block(hook_name: str) -> bool:
    """True for ``blocks.L.hook_resid_pre`` with L >= 1: on the plain modules it shares block L-1's output with
    ``blocks.{L-1}.hook_resid_post``, whose hooks run before it on the hooked path."""
    return hook_name.endswith(".hook_resid_pre") and not hook_name.startswith("blocks.0.")


@contextmanager
def site_hooks(plain_model: Any, arch: Architecture, hooks: list[tuple[str, HookFn]]) -> Iterator[None]:
    """Run TransformerLens-style ``(hook name, fn)`` pairs as PyTorch hooks on the plain model's modules."""
    handles = []
    try:
        # blocks.L.hook_resid_pre (L >= 1) lives on block L-1's output, beside blocks.{L-1}.hook_resid_post; the
        # hooked path runs resid_post(L-1)'s hooks first, so they are registered first (a stable sort keeps the
        # given order among the rest, and among several hooks at one point)
        for name, fn in sorted(hooks, key=lambda pair: _runs_after_previous_block(pair[0])):
            site = arch.site(name)
            if site is None:
                raise ValueError(f"hook point {name!r} has no plain-module site on {arch.model_type}")
            module = site_module(plain_model, site)
            if site.where == "output":
                handles.append(module.register_forward_hook(_output_hook(fn)))
            else:
                handles.append(module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def foreign_hooks(model: nn.Module) -> list[str]:
    """Hooks registered on ``model`` that emlens did not put there: TransformerLens hook points with
    hooks, or PyTorch hooks on any module (TransformerLens' own internal capture hooks excepted)."""
    from torch.nn.modules import module as torch_module

    found = []
    for kind in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        if getattr(torch_module, kind, None):
            found.append(f"a global PyTorch {kind[8:].replace('_', ' ')}")
    for name, sub in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            for fn in getattr(sub, attr, {}).values():
                if not getattr(fn, "__module__", "").startswith("transformer_lens") or type(sub).__name__ == "HookPoint":
                    found.append(f"{name} ({attr.strip('_').replace('_', ' ')[:-1]})")
    return found
