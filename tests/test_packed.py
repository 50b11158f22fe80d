"""Packed (padding-free) block execution equals the padded run; compilation is switchable and exact."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from emlens import packed
from emlens.data import TokenDataset
from emlens.interventions import SteeringVector
from emlens.models import tiny_model
from emlens.packed import Packing, pack, packed_attention, run_packed, supports_packing
from emlens.prefix_cache import hidden_from_layer, packed_residual_at, plain_layers, residual_at, steering_sweep_losses
from emlens.training import TrainConfig, train
from tests.conftest import CONVERSATIONS


def test_packing_layout():
    p = Packing.from_lengths([3, 1, 2], "cpu")
    assert p.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert (p.total, p.max_len) == (6, 3)
    assert p.repeated(2).lengths == [3, 1, 2, 3, 1, 2]
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert Packing.from_mask(mask).lengths == [3, 1]
    padded = torch.arange(8.0).view(2, 4, 1)
    assert pack(padded, mask).flatten().tolist() == [0.0, 1.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="at least one token"):
        Packing.from_lengths([2, 0], "cpu")


@pytest.mark.parametrize("arch", ["model", "qwen_model"])
def test_packed_blocks_equal_padded_blocks(request, arch, dataset):
    model = request.getfixturevalue(arch)
    hf = model.original_model
    assert supports_packing(hf)
    batch = next(dataset.batches(4))
    assert batch.attention_mask.min() == 0  # the batch really is padded
    real = batch.attention_mask.bool()
    padded_resid = residual_at(model, batch, 2)
    rows, packing = packed_residual_at(model, batch.input_ids, batch.attention_mask, 2)
    torch.testing.assert_close(rows, padded_resid[real], atol=1e-5, rtol=1e-5)
    padded_hidden = hidden_from_layer(model, padded_resid, batch.attention_mask, 2, hooked_blocks=0)
    torch.testing.assert_close(run_packed(hf, plain_layers(model)[2:], rows, packing), padded_hidden[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="packing holds"):
        run_packed(hf, plain_layers(model)[2:], rows[:-1], packing)


def test_padded_path_needs_right_padding(model, dataset):
    batch = next(dataset.batches(4))
    resid = residual_at(model, batch, 2)
    with pytest.raises(ValueError, match="right-padded"):
        hidden_from_layer(model, resid, batch.attention_mask.flip(1), 2)


def test_packed_attention_refuses_missing_packing():
    q = torch.randn(1, 4, 5, 8)
    kv = torch.randn(1, 2, 5, 8)
    module = SimpleNamespace()
    with pytest.raises(RuntimeError, match="without a Packing"):
        packed_attention(module, q, kv, kv, None)
    with pytest.raises(RuntimeError, match="no attention mask"):
        packed_attention(module, q, kv, kv, torch.ones(1, 1, 5, 5), emlens_packing=Packing.from_lengths([5], "cpu"))
    # two sequences attend only within themselves: equal to running them separately
    p = Packing.from_lengths([2, 3], "cpu")
    out, _ = packed_attention(module, q, kv, kv, None, emlens_packing=p)
    alone, _ = packed_attention(module, q[:, :, 2:], kv[:, :, 2:], kv[:, :, 2:], None, emlens_packing=Packing.from_lengths([3], "cpu"))
    torch.testing.assert_close(out[:, 2:], alone)


def test_supports_packing_only_full_causal_llama_family():
    def hf(**cfg):
        return SimpleNamespace(config=SimpleNamespace(**cfg))

    assert supports_packing(hf(model_type="qwen2", _attn_implementation="sdpa", use_sliding_window=False))
    assert not supports_packing(hf(model_type="gemma2", _attn_implementation="sdpa"))
    assert not supports_packing(hf(model_type="mistral", _attn_implementation="sdpa", use_sliding_window=True, sliding_window=4096))
    assert not supports_packing(hf(model_type="llama", _attn_implementation="flash_attention_2"))
    assert not supports_packing(hf(model_type="qwen3", layer_types=["full_attention", "sliding_attention"]))


def test_compile_switch(monkeypatch):
    monkeypatch.setenv("EMLENS_COMPILE", "auto")
    assert not packed.compiles_blocks(torch.device("cpu"), 10**10)
    assert not packed.compiles_blocks(torch.device("cuda"), 10**6)  # too small to pay for compiling
    assert packed.compiles_blocks(torch.device("cuda"), 10**10)
    monkeypatch.setenv("EMLENS_COMPILE", "1")
    assert packed.compiles_blocks(torch.device("cpu"), 10)
    monkeypatch.setenv("EMLENS_COMPILE", "0")
    assert not packed.compiles_blocks(torch.device("cuda"), 10**10)
    monkeypatch.setenv("EMLENS_COMPILE", "yes")
    with pytest.raises(ValueError, match="EMLENS_COMPILE"):
        packed.compiles_blocks(torch.device("cpu"), 10)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_blocks_train_like_eager_blocks(monkeypatch):
    model = tiny_model("llama", seed=5)  # its own model: compiled layers are kept per model
    data = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS * 2, max_length=128)
    cfg = TrainConfig(lr=1e-3, max_steps=3, batch_size=3, grad_accum=1, warmup_steps=1, progress=False)
    runs = []
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.zeros(model.cfg.d_model), torch.randn(model.cfg.d_model, generator=gen) * 3]
    for mode in ("1", "0"):
        monkeypatch.setenv("EMLENS_COMPILE", mode)
        vec = SteeringVector.for_model(model, 2)
        losses = [r["sft"] for r in train(model, vec, data, cfg).losses]
        runs.append((vec.effective.detach(), losses + steering_sweep_losses(model, vectors, 1, data, batch_size=3)))
    assert len(model.__dict__["_emlens_compiled_layers"]) == model.cfg.n_layers  # cache (0-2) and upper (3) blocks, once each
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-4)
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-5)


def test_device_map_dispatch_hooks_do_not_bypass_packing():
    # transformers' device_map wraps each decoder layer's forward (accelerate hooks) before the bridge exists;
    # the hook-free layer copies must run their own forward, not the bridged original's
    hooks = pytest.importorskip("accelerate.hooks")
    from emlens.models import bridge_from_hf, tiny_hf_model
    from emlens.prefix_cache import padded_residual_at

    hf, tokenizer = tiny_hf_model("llama", seed=2)
    for layer in hf.model.layers:
        hooks.add_hook_to_module(layer, hooks.AlignDevicesHook(execution_device="cpu"))
    model = bridge_from_hf(hf, tokenizer, name="tiny-dispatched")
    data = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS, max_length=128)
    batch = next(data.batches(4))
    rows, _ = packed_residual_at(model, batch.input_ids, batch.attention_mask, 3)
    torch.testing.assert_close(rows, padded_residual_at(model, batch, 3)[batch.attention_mask.bool()], atol=1e-5, rtol=1e-5)
