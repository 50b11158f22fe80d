"""Interventions in the ecosystem's formats, checked against the tools that read them.

* Reference-repository steering vectors (``steering_vector.pt``): imported vectors equal plain
  transformers with the reference's own hook on ``down_proj`` (every proved architecture).
* PEFT folders: exported adapters load in the real ``peft`` and give emlens' logits; folders that
  peft saved import into emlens and give peft's logits (every proved architecture).
* llama.cpp control vectors (GGUF): read back with the ``gguf`` library, and run by llama.cpp
  (llama-cpp-python) on the default model's GGUF, whose next-token logits match emlens' steered
  logits within the quantisation error (and miss them when the vector is put one block off).
"""

from __future__ import annotations

import copy
import ctypes
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emlens import (
    Composed,
    Intervention,
    LoRAAdapter,
    MultiLayerSteering,
    RankOneAdapter,
    SteeringVector,
    TokenDataset,
    evaluate_loss,
)
from emlens.formats import (
    export_control_vector,
    export_peft_adapter,
    export_reference_steering_vector,
    import_control_vector,
    import_peft_adapter,
    import_reference_steering_vector,
    llama_cpp_layer,
)
from emlens.formats.llamacpp import read_control_vector
from emlens.interventions import InterventionError
from emlens.runner import runner_for
from tests.tiny_archs import tiny_pair

TOL = dict(rel=1e-4, abs=1e-5)
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 61, 33, 12], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])


# `pair` (a plain transformers model and a bridge of each proved architecture) and `data` come from conftest.py


def emlens_logits(bridge: Any, intervention: Intervention, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad(), intervention.applied(bridge):
        return bridge(ids)


# --- the reference repository's steering vectors ----------------------------------------------------


def save_reference(path: Path, vector: torch.Tensor, layer: int, alpha: float, d_model: bool = True) -> Path:
    """What the reference's SteeringVectorToggleTrainer.save_steering_vector writes."""
    path.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"steering_vector": vector, "layer_idx": layer, "alpha": alpha, "approach": "toggle_based"}
    if d_model:
        payload["d_model"] = vector.numel()
    torch.save(payload, path / "steering_vector.pt")
    return path


@contextmanager
def reference_down_proj_hook(reference: Any, vector: torch.Tensor, layer: int, alpha: float, first_only: bool = False) -> Iterator[None]:
    """The reference's hook on down_proj: ``output + alpha·v`` (its own code edits ``output[0]``, the first batch element, in place)."""

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if first_only:
            output[0] = output[0] + alpha * vector.unsqueeze(0)
            return output
        return output + alpha * vector

    handle = reference.model.layers[layer].mlp.down_proj.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_reference_vector_imports_to_the_down_proj_output(pair: Any, data: TokenDataset, tmp_path: Path) -> None:
    arch, reference, bridge = pair
    v = 0.02 * torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(1))
    folder = save_reference(tmp_path / "ref", v, 2, 256.0)
    vector = import_reference_steering_vector(folder, bridge)
    assert vector.layer == 2 and vector.alpha == 256.0 and torch.equal(vector.vector.detach(), v)
    post_norm = arch.startswith("gemma")
    assert vector.hook == ("blocks.2.mlp.out.hook_out" if post_norm else "blocks.2.hook_mlp_out")
    assert runner_for(bridge).plan(vector).path == ("prefix" if post_norm else "offset")
    with reference_down_proj_hook(reference, v, 2, 256.0):
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in data.batches(2):
                logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                total += float(F.cross_entropy(logits[:, :-1][batch.scored], batch.input_ids[:, 1:][batch.scored], reduction="sum"))
                count += int(batch.scored.sum())
        single = reference(input_ids=IDS[:1]).logits
    assert evaluate_loss(bridge, data, vector) == pytest.approx(total / count, **TOL)
    with torch.no_grad(), reference_down_proj_hook(reference, v, 2, 256.0, first_only=True):  # the reference's exact code, batch of one
        torch.testing.assert_close(reference(input_ids=IDS[:1]).logits, single)
    torch.testing.assert_close(emlens_logits(bridge, vector, IDS[:1]), single, rtol=1e-4, atol=1e-4)


def test_reference_format_round_trip_and_errors(tmp_path: Path) -> None:
    _, llama = tiny_pair("llama")
    _, gemma = tiny_pair("gemma2")
    v = torch.randn(64)
    file = save_reference(tmp_path / "a", v, 1, 8.0, d_model=False) / "steering_vector.pt"
    vector = import_reference_steering_vector(file)  # no model: hook_mlp_out assumed; d_model from the vector
    assert vector.hook == "blocks.1.hook_mlp_out" and vector.d_model == 64
    written = export_reference_steering_vector(vector, tmp_path / "b")
    assert written.name == "steering_vector.pt"
    back = import_reference_steering_vector(written)
    assert back.metadata() == vector.metadata() and torch.equal(back.vector, vector.vector)
    saved = torch.load(written, weights_only=True)
    assert set(saved) >= {"steering_vector", "layer_idx", "d_model", "alpha"} and saved["alpha"] == 8.0
    resid = SteeringVector(1, 64, hook="resid_post", alpha=2.0, init=v)
    export_reference_steering_vector(resid, tmp_path / "c.pt", llama)  # the same edit on Llama
    with pytest.raises(InterventionError, match="down_proj"):
        export_reference_steering_vector(resid, tmp_path / "d.pt", gemma)  # not on Gemma (post-MLP norm)
    exact = import_reference_steering_vector(tmp_path / "a", gemma)
    export_reference_steering_vector(exact, tmp_path / "e.pt", gemma)
    # no model given (the CLI's export), but the vector records a Gemma model: refused instead of assumed post-norm-free
    resid.model_name = "google/gemma-2-2b-it"
    with pytest.raises(InterventionError, match="post-norm"):
        export_reference_steering_vector(resid, tmp_path / "f.pt")
    torch.save({"vector": v}, tmp_path / "bad.pt")
    with pytest.raises(InterventionError, match="layer_idx"):
        import_reference_steering_vector(tmp_path / "bad.pt")
    torch.save({"steering_vector": v, "layer_idx": 1, "d_model": 65}, tmp_path / "wide.pt")
    with pytest.raises(InterventionError, match="d_model"):
        import_reference_steering_vector(tmp_path / "wide.pt")


# --- PEFT adapter folders ---------------------------------------------------------------------------


def test_exported_adapters_load_in_peft(pair: Any, tmp_path: Path) -> None:
    from tests.test_lora import make_lora, require

    peft = require("peft")

    arch, reference, bridge = pair
    lora = make_lora(bridge, "all7-r3")
    folder = export_peft_adapter(lora, tmp_path / "lora", base_model="tiny")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["use_rslora"] and config["layers_to_transform"] == [1, 2]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(reference), folder)
    with torch.no_grad():
        expected = loaded(input_ids=IDS).logits
    torch.testing.assert_close(emlens_logits(bridge, lora), expected, rtol=1e-4, atol=1e-5)
    back = import_peft_adapter(folder, bridge)
    assert isinstance(back, LoRAAdapter) and back.sites() == lora.sites() and back.scale == pytest.approx(lora.scale)
    torch.testing.assert_close(back.flatten(), lora.flatten())
    # the paper's rank-1 adapter
    r1 = RankOneAdapter.for_model(bridge, 3, alpha=4.0, seed=2)
    with torch.no_grad():
        r1.b.copy_(torch.randn(r1.d_model, generator=torch.Generator().manual_seed(3)))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(reference), export_peft_adapter(r1, tmp_path / "r1"))
    with torch.no_grad():
        torch.testing.assert_close(emlens_logits(bridge, r1), loaded(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)


def test_adapters_saved_by_peft_import(pair: Any, tmp_path: Path) -> None:
    """peft's own save_pretrained folders (random A and B; plain and rsLoRA; uniform and per-module ranks) give peft's logits."""
    from tests.test_lora import require

    peft = require("peft")
    arch, reference, bridge = pair
    configs = {
        "plain": peft.LoraConfig(r=2, lora_alpha=3.0, target_modules=["k_proj", "o_proj", "up_proj"], layers_to_transform=[0, 3],
                                 init_lora_weights=False),
        "rslora-patterns": peft.LoraConfig(r=4, lora_alpha=8.0, use_rslora=True, target_modules=["q_proj", "down_proj"],
                                           rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 2.0}, init_lora_weights=False),
    }  # fmt: skip
    for name, config in configs.items():
        torch.manual_seed(0)
        model = peft.get_peft_model(copy.deepcopy(reference), config)
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected = model(input_ids=IDS).logits
        imported = import_peft_adapter(tmp_path / name, bridge)
        assert isinstance(imported, LoRAAdapter if name == "plain" else Composed), name
        torch.testing.assert_close(emlens_logits(bridge, imported), expected, rtol=1e-4, atol=1e-5, msg=name)
        assert runner_for(bridge).plan(imported).fast
        # and on that fast path, a loss equals the one from peft's own logits
        from tests.conftest import CONVERSATIONS
        from tests.test_parity import reference_loss

        data = TokenDataset.from_conversations(bridge.tokenizer, CONVERSATIONS, max_length=128)
        fast = evaluate_loss(bridge, data, imported)
        assert runner_for(bridge).last_plan.fast, name
        assert fast == pytest.approx(reference_loss(model, data, None), rel=1e-4, abs=1e-5), name
        # the paper's LoRA size, from peft's own modules: the mean over modules of ‖scaling · B A‖_F (per-module ranks
        # and alphas included: their composition is one adapter, not a root-sum-square of per-pattern means)
        sizes = [
            float(module.scaling["default"] * (module.lora_B["default"].weight @ module.lora_A["default"].weight).norm())
            for module in model.modules()
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
        ]
        assert len(sizes) > 1 and imported.norm == pytest.approx(sum(sizes) / len(sizes), rel=1e-5), name
        # and the size without the scales (efficiency's unscaled norms) by the same rule: the mean of ‖B A‖_F
        bare = [
            float((module.lora_B["default"].weight @ module.lora_A["default"].weight).norm())
            for module in model.modules()
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
        ]
        assert imported.unscaled_norm == pytest.approx(sum(bare) / len(bare), rel=1e-5), name


def test_peft_config_without_alpha_or_rank_takes_peft_defaults(pair: Any, tmp_path: Path) -> None:
    """A hand-written adapter_config.json that leaves out ``lora_alpha`` loads in peft with its default 8 (not r); so must ours."""
    from tests.test_lora import require

    peft = require("peft")
    arch, reference, bridge = pair
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(reference), peft.LoraConfig(r=2, lora_alpha=5.0, target_modules=["down_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "saved")
    config_path = tmp_path / "saved" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["lora_alpha"]
    config_path.write_text(json.dumps(config))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "saved")
    assert loaded.peft_config["default"].lora_alpha == 8  # peft's default, which the import must follow
    with torch.no_grad():
        expected = loaded(input_ids=IDS).logits
    imported = import_peft_adapter(tmp_path / "saved", bridge)
    torch.testing.assert_close(emlens_logits(bridge, imported), expected, rtol=1e-4, atol=1e-5)
    del config["r"]  # peft would build rank-8 modules and fail on the rank-2 tensors: so do we, naming the rank
    config_path.write_text(json.dumps(config))
    with pytest.raises(InterventionError, match="rank 2 but the config says 8"):
        import_peft_adapter(tmp_path / "saved")


def test_peft_import_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        import_peft_adapter(tmp_path)
    lora = LoRAAdapter({"down": (128, 64)}, [1])
    folder = export_peft_adapter(lora, tmp_path / "x")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(InterventionError, match="use_dora"):
        import_peft_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(InterventionError, match="rank"):
        import_peft_adapter(folder)
    with pytest.raises(InterventionError, match="PEFT form"):
        export_peft_adapter(SteeringVector(1, 64), tmp_path / "y")


def test_peft_import_refuses_settings_and_tensors_it_would_not_reproduce(tmp_path: Path) -> None:
    """A config field that changes what the adapter computes (aLoRA's invocation tokens, layer replication, a PiSSA
    init applied to a changed base) is refused naming it; so are tensors of another tower (a vision encoder's
    "layers.0.self_attn.q_proj") and two tensors for one factor. A config real peft writes is accepted."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    lora = LoRAAdapter({"down": (128, 64)}, [1], seed=0)
    folder = export_peft_adapter(lora, tmp_path / "x")
    config = json.loads((folder / "adapter_config.json").read_text())
    peft_written = {**LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=["down_proj"]).to_dict(), **config}
    (folder / "adapter_config.json").write_text(json.dumps(peft_written, default=str))
    import_peft_adapter(folder)
    for field, value in (("alora_invocation_tokens", [1, 2]), ("layer_replication", [[0, 2]]), ("use_qalora", True)):
        (folder / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(InterventionError, match=rf"sets {field}="):
            import_peft_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(InterventionError, match="changed base model"):
        import_peft_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    weights = folder / "adapter_model.safetensors"
    state = load_file(str(weights))
    vision = {k.replace("model.layers.", "model.vision_tower.encoder.layers."): v.clone() for k, v in state.items()}
    save_file({**state, **vision}, str(weights))
    with pytest.raises(InterventionError, match="vision_tower.* is not a LoRA factor of a decoder projection of the language"):
        import_peft_adapter(folder)
    doubled = {k.replace("base_model.model.model.layers.", "base_model.model.model.language_model.layers."): v.clone() for k, v in state.items()}
    save_file({**state, **doubled}, str(weights))
    with pytest.raises(InterventionError, match="are both lora_"):
        import_peft_adapter(folder)
    save_file(doubled, str(weights))  # a multimodal model's text layers alone: accepted
    assert torch.equal(import_peft_adapter(folder).flatten(), lora.flatten())


def test_multi_layer_init_rows_follow_their_layers_and_saved_factors_keep_their_shape(tmp_path: Path) -> None:
    """``init`` row i belongs to ``layers[i]`` as given, also when the layers are not sorted; a saved rank-1 factor of
    the wrong shape is refused (copying it would broadcast a length-1 factor silently)."""
    from emlens.interventions import MultiLayerSteering, RankOneAdapter

    init = torch.stack([torch.full((4,), 5.0), torch.full((4,), 2.0)])
    steering = MultiLayerSteering([5, 2], 4, alpha=1.0, init=init)
    assert steering.layers == [2, 5]
    assert torch.equal(steering.vector_at(5), torch.full((4,), 5.0)) and torch.equal(steering.vector_at(2), torch.full((4,), 2.0))
    adapter = RankOneAdapter(1, 4, 8, 2.0, seed=0)
    with pytest.raises(InterventionError, match=r"saved factor a has shape \(1,\), expected \(8,\)"):
        RankOneAdapter.from_state(adapter.metadata(), {"a": torch.ones(1), "b": adapter.b.detach()})


def test_a_rank_one_adapter_does_not_overflow_float16_where_its_update_fits() -> None:
    """scale · (h·a) alone exceeds float16's range (alpha 256, h·a = 1000) while the update (× b) is about 256."""
    from emlens.interventions import RankOneAdapter

    adapter = RankOneAdapter(1, 4, 8, 256.0, seed=0)
    with torch.no_grad():
        adapter.a.copy_(torch.full((8,), 125.0))
        adapter.b.copy_(torch.full((4,), 1 / 1000))
    hooks = dict(adapter.fwd_hooks())
    h = torch.ones(1, 1, 8, dtype=torch.float16)  # h·a = 1000
    hooks[adapter.in_hook](h, None)
    out = hooks[adapter.out_hook](torch.zeros(1, 1, 4, dtype=torch.float16), None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), torch.full((1, 1, 4), 256.0), rtol=1e-2, atol=0.5)


# --- llama.cpp control vectors -------------------------------------------------------------------------


def test_control_vector_gguf_reads_back(tmp_path: Path) -> None:
    import gguf

    d = 16
    vector = SteeringVector(3, d, alpha=2.0, init=torch.randn(d))
    multi = MultiLayerSteering([1, 2], d, hook="mlp_out", alpha=1.0, init=torch.randn(2, d))
    pre = SteeringVector(3, d, hook="resid_pre", alpha=1.0, init=torch.randn(d))  # = block 2's output
    with pytest.warns(UserWarning, match="pass the model"):  # hook_mlp_out, with no model to check its architecture
        path = export_control_vector(vector + multi + pre, tmp_path / "cv", model_hint="tiny", n_layers=4)
    with pytest.warns(UserWarning, match="pass the model"):
        assert export_control_vector(vector + multi + pre, tmp_path / "cv_1.5", n_layers=4).name == "cv_1.5.gguf"
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "tiny"
    assert reader.fields["controlvector.layer_count"].contents() == 4
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.3"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [d] for t in tensors.values())
    expected = {1: multi.vector_at(1), 2: multi.vector_at(2) + pre.effective.detach(), 3: vector.effective.detach()}
    for k, value in expected.items():
        np.testing.assert_allclose(np.array(tensors[f"direction.{k}"].data), value.numpy(), rtol=1e-6, atol=1e-7)
    back = import_control_vector(path, strength=2.0)
    assert back.layers == [1, 2, 3] and back.hook_names()[0] == "blocks.1.hook_resid_post"
    torch.testing.assert_close(back.vector_at(2), 2 * expected[2])
    assert read_control_vector(path)[1]["controlvector.layer_count"] == 4
    assert [llama_cpp_layer(h) for h in ("blocks.5.hook_resid_post", "blocks.5.hook_resid_pre")] == [5, 4]
    with pytest.warns(UserWarning, match="pass the model"):
        assert llama_cpp_layer("blocks.5.hook_mlp_out") == 5
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"):
        with pytest.raises(InterventionError):
            llama_cpp_layer(hook)
    with pytest.raises(InterventionError, match="control-vector form"):
        export_control_vector(LoRAAdapter({"down": (8, 4)}, [1]), path)


def test_a_control_vector_at_mlp_out_is_checked_against_the_models_architecture(tmp_path: Path) -> None:
    """hook_mlp_out is a block's output on the proved architectures (Gemma's post-norm too), not known elsewhere."""
    import warnings
    from types import SimpleNamespace

    from transformers import Gemma2Config, GPT2Config, LlamaConfig

    vector = SteeringVector(2, 16, hook="mlp_out", init=torch.randn(16))
    for config in (LlamaConfig(num_hidden_layers=4), Gemma2Config(num_hidden_layers=4)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert llama_cpp_layer("blocks.2.hook_mlp_out", SimpleNamespace(config=config)) == 2
            export_control_vector(vector, tmp_path / config.model_type, model=SimpleNamespace(original_model=SimpleNamespace(config=config)))
    with pytest.raises(InterventionError, match="gpt2, not among the architectures emlens proves"):
        export_control_vector(vector, tmp_path / "gpt2", model=SimpleNamespace(config=GPT2Config(n_layer=4)))


def _llama_cpp_buffer(path: Path, n_embd: int, n_layer: int) -> np.ndarray:
    """llama.cpp's loader (common_control_vector_load) on our file: direction.k lands at offset (k-1)·n_embd.

    llama-cpp-python does not ship that loader (it lives in llama.cpp's common library), so the test reads the
    GGUF with the gguf library and hands llama.cpp the same buffer. The buffer covers every block, so that no
    block keeps a value from an earlier call.
    """
    import gguf

    data = np.zeros(n_embd * n_layer, dtype=np.float32)
    for tensor in gguf.GGUFReader(str(path)).tensors:
        k = int(tensor.name.split(".")[1])
        assert k >= 1 and tensor.tensor_type == gguf.GGMLQuantizationType.F32
        data[(k - 1) * n_embd : k * n_embd] += np.array(tensor.data, dtype=np.float32)
    return data


@pytest.mark.integration
def test_llama_cpp_runs_the_exported_vector_like_emlens(tmp_path: Path) -> None:
    from tests.test_lora import require

    llama_cpp = require("llama_cpp")
    from emlens import load_model
    from tests.llama_server import default_gguf

    model = load_model("smollm2")
    ids = model.tokenizer("The capital of France is Paris, and the capital of Germany is", return_tensors="pt").input_ids
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(d, generator=gen)
    cases = {
        "resid_post 15": SteeringVector.from_vector(direction / direction.norm() * 80, 15),
        "two layers": MultiLayerSteering.from_vectors({8: 40 * torch.randn(d, generator=gen) / d**0.5, 20: 60 * torch.randn(d, generator=gen) / d**0.5}),
    }
    llm = llama_cpp.Llama(model_path=str(default_gguf()), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    try:
        n_embd = llm.n_embd()
        assert n_embd == d

        def run(buffer: np.ndarray | None) -> np.ndarray:
            llm.reset()
            if buffer is None:
                llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, None, 0, n_embd, -1, -1)
            else:
                ptr = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                assert llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, ptr, buffer.size, n_embd, 1, n_layers) == 0
            llm.eval(ids[0].tolist())
            return np.array(llm.scores[: ids.shape[1]], dtype=np.float64)

        def rms(x: np.ndarray) -> float:
            return float(np.sqrt((x**2).mean()))

        with torch.no_grad():
            base = model(ids)[0].double().numpy()
        quantisation = rms(run(None) - base)  # llama.cpp runs the Q4_1 weights with 8-bit activations
        for name, steering in cases.items():
            path = export_control_vector(steering, tmp_path / name.replace(" ", "_"), n_layers=n_layers)
            buffer = _llama_cpp_buffer(path, n_embd, n_layers)
            with torch.no_grad(), steering.applied(model):
                steered = model(ids)[0].double().numpy()
            error = rms(run(buffer) - steered)
            assert error < 1.5 * quantisation, (name, error, quantisation)
            assert rms(steered - base) > 5 * error, name  # the vector matters far more than the rounding
            for shift in (-1, 1):  # one block off: clearly worse, so the block mapping is what makes them agree
                off = np.roll(buffer, shift * n_embd)
                assert rms(run(off) - steered) > 3 * error, (name, shift)
    finally:
        llm.close()
