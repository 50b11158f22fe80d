
import pytest
import torch

from emlens.interventions import Intervention, InterventionError, RankOneAdapter, SteeringVector, load_intervention
from emlens.models import bridge_from_hf, tiny_hf_model


def random_vector(model, layer=1, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return SteeringVector.from_vector(torch.randn(model.cfg.d_model, generator=gen), layer, **kw)


def random_adapter(model, layer=1, seed=0):
    adapter = RankOneAdapter.for_model(model, layer, seed=seed)
    with torch.no_grad():
        adapter.b.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return adapter


def test_zero_and_disabled_interventions_give_base_logits_exactly(model, token_ids):
    base = model(token_ids)
    for intervention in [SteeringVector.for_model(model), RankOneAdapter.for_model(model)]:
        with intervention.applied(model):
            assert torch.equal(model(token_ids), base)
    for intervention in [random_vector(model), random_adapter(model)]:
        with intervention.applied(model):
            steered = model(token_ids)
            with intervention.disabled():
                assert torch.equal(model(token_ids), base)
        assert not torch.allclose(steered, base)
    assert torch.equal(model(token_ids), base)  # hooks removed on exit


@pytest.mark.parametrize("make", [random_vector, random_adapter])
def test_every_batch_element_is_steered(model, token_ids, make):
    """The reference code steered only batch element 0; here each row matches a run of that row alone."""
    intervention = make(model)
    with intervention.applied(model):
        batched = model(token_ids)
        for row in range(token_ids.shape[0]):
            alone = model(token_ids[row : row + 1])
            torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)
    base = model(token_ids)
    for row in range(token_ids.shape[0]):
        assert (batched[row] - base[row]).abs().max() > 1e-3


def test_steering_adds_vector_to_residual(model, token_ids):
    vec = random_vector(model, layer=2)
    store = []

    def grab(act, hook):
        store.append(act.detach().clone())

    with torch.no_grad():
        with model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", grab)]):
            model(token_ids)
        with vec.applied(model), model.hooks(fwd_hooks=[("blocks.3.hook_resid_pre", grab)]):
            model(token_ids)
    base_resid, steered_next_input = store
    torch.testing.assert_close(steered_next_input, base_resid + vec.effective)


def test_positions_restrict_steering(model, token_ids):
    vec = random_vector(model, layer=1, positions=[5])
    base = model(token_ids)
    with vec.applied(model):
        out = model(token_ids)
    torch.testing.assert_close(out[:, :5], base[:, :5])  # causal: earlier positions unaffected
    assert (out[:, 5:] - base[:, 5:]).abs().max() > 1e-3


def test_adapter_equals_weight_surgery(token_ids):
    hf, tok = tiny_hf_model("llama", seed=3)
    bridge = bridge_from_hf(hf, tok)
    adapter = random_adapter(bridge, layer=2, seed=5)
    with adapter.applied(bridge):
        hooked = bridge(token_ids)
    edited_hf, edited_tok = tiny_hf_model("llama", seed=3)
    with torch.no_grad():
        edited_hf.model.layers[2].mlp.down_proj.weight += adapter.delta_weight()
    edited = bridge_from_hf(edited_hf, edited_tok)(token_ids)
    torch.testing.assert_close(hooked, edited, atol=1e-4, rtol=1e-4)


def test_bad_hook_name_is_named_with_suggestion(model, token_ids):
    vec = SteeringVector(1, model.cfg.d_model, hook="blocks.1.hook_resid_pots")
    with pytest.raises(InterventionError, match="no hook point 'blocks.1.hook_resid_pots'.*blocks.1.hook_resid_post"):
        with vec.applied(model):
            pass


def test_width_mismatch_is_named(model, token_ids):
    with pytest.raises(InterventionError, match="width 32 but the model's d_model is 64"):
        with SteeringVector(1, 32).applied(model):
            pass
    wrong = SteeringVector(1, 32, hook="blocks.1.attn.hook_q")
    with pytest.raises(InterventionError, match="width 32 but the activation at blocks.1.attn.hook_q"):
        with wrong.applied(model):
            model(token_ids)
    with pytest.raises(InterventionError, match=r"\(d_model, d_mlp\) = \(64, 99\)"):
        with RankOneAdapter(1, 64, 99).applied(model):
            pass
    with pytest.raises(InterventionError, match="init has shape"):
        SteeringVector(1, 64, init=torch.zeros(3))


def test_hook_shorthands_and_mlp_out_equivalence(model, token_ids):
    vec = random_vector(model, layer=1)
    via_mlp = SteeringVector.from_vector(vec.effective, 1, hook="mlp_out")
    assert via_mlp.hook == "blocks.1.hook_mlp_out"
    with vec.applied(model):
        a = model(token_ids)
    with via_mlp.applied(model):
        b = model(token_ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_norm_scaling_and_direction(model):
    vec = random_vector(model)
    scaled = vec.scaled_to(3.0)
    assert scaled.norm == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(scaled.direction, vec.direction)
    assert vec.direction.norm().item() == pytest.approx(1.0, rel=1e-5)
    adapter = random_adapter(model)
    half = adapter.scaled_to(adapter.norm / 2)
    torch.testing.assert_close(half.delta_weight(), adapter.delta_weight() / 2, atol=1e-5, rtol=1e-4)
    assert torch.linalg.matrix_norm(adapter.delta_weight()).item() == pytest.approx(adapter.norm, rel=1e-4)
    with pytest.raises(InterventionError, match="zero steering vector"):
        SteeringVector(0, 8).scaled_to(1.0)


@pytest.mark.parametrize("make", [random_vector, random_adapter])
def test_save_load_roundtrip(tmp_path, model, token_ids, make):
    original = make(model)
    original.model_name = "tiny-llama"
    path = original.save(tmp_path / "iv")
    assert path.suffix == ".safetensors"
    # a dotted name keeps its last part: kl=6.6 and kl=6.9 are two files (replacing ".6" made them one)
    dotted = [original.save(tmp_path / f"kl={x}") for x in ("6.6", "6.9")]
    assert [p.name for p in dotted] == ["kl=6.6.safetensors", "kl=6.9.safetensors"] and all(p.is_file() for p in dotted)
    loaded = load_intervention(path)
    assert type(loaded) is type(original)
    assert loaded.metadata() == original.metadata()
    with original.applied(model):
        a = model(token_ids)
    with loaded.applied(model):
        b = model(token_ids)
    assert torch.equal(a, b)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no intervention file"):
        Intervention.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InterventionError, match="not an emlens intervention"):
        Intervention.load(tmp_path / "plain.safetensors")


def test_works_on_qwen2_architecture(qwen_model, token_ids):
    vec = random_vector(qwen_model, layer=2)
    base = qwen_model(token_ids)
    with vec.applied(qwen_model):
        assert (qwen_model(token_ids) - base).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["rank_one", "lora"])
def test_an_adapter_output_hook_without_its_input_hook_raises_and_a_disabled_adapter_does_nothing(model, kind):
    from emlens import LoRAAdapter

    adapter = RankOneAdapter.for_model(model, 1) if kind == "rank_one" else LoRAAdapter.for_model(model, [1], ["down_proj"], rank=2)
    (in_name, read_input), (out_name, add_update) = adapter.fwd_hooks()
    out = torch.zeros(1, 3, model.cfg.d_model)
    with pytest.raises(InterventionError, match=f"{in_name} did not fire before {out_name}"):
        add_update(out, None)
    with adapter.disabled():
        assert read_input(torch.zeros(1, 3, model.cfg.d_mlp), None) is None and add_update(out, None) is None
