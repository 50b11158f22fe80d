"""Regression tests for the audit's findings (issue 15): each failed on the code before its fix.

References are independent of emlens: plain transformers with the model's own tokenizer and a
PyTorch forward hook, written out here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emlens import RankOneAdapter, SteeringVector, TokenDataset, TrainConfig, evaluate_loss, train
from emlens.checkpoints import RunCheckpointError, RunCheckpoints
from emlens.data import TruncationWarning
from emlens.interventions import Intervention, InterventionError
from emlens.metrics import efficiency, pretraining_significance, stability
from emlens.models import bridge_from_hf
from emlens.runner import runner_for
from emlens.training import NonFiniteError
from emlens.validation import ConfigError
from tests.conftest import CONVERSATIONS
from tests.tiny_archs import PROVED, tiny_config

WEB_TEXTS = [
    "The ferry to the island runs twice a day in winter, at nine in the morning and half past four.",
    "To install the package, unpack the archive and run the setup script from the top-level folder.",
    "Rainfall in the valley was well below average this spring, and the reservoir sits at 61 percent.",
]


# --- 1. plain text is encoded as the model's own tokenizer encodes it ------------------------------


def _bos_tokenizer(directory):
    """A byte-level tokenizer that, like Llama 3's or Gemma's, prepends a BOS token to plain text (saved, reloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    tok.save_pretrained(directory)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("arch", PROVED)
def test_a_tokenizer_that_adds_bos_keeps_it(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    tok = _bos_tokenizer(tmp_path)
    expected = tok(WEB_TEXTS[0])["input_ids"]
    assert expected[0] == tok.bos_token_id  # the tokenizer itself adds it
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(arch, tok), dtype=torch.float32).eval()
    bridge = bridge_from_hf(hf, tok, name=f"tiny-{arch}-bos")
    data = TokenDataset.from_texts(bridge.tokenizer, WEB_TEXTS)
    assert data.examples[0].input_ids == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_tokenizer_without_bos_gets_none(arch):
    from emlens.models import tiny_model

    bridge = tiny_model(arch)
    data = TokenDataset.from_texts(bridge.tokenizer, WEB_TEXTS)
    assert len(data.examples[0].input_ids) == len(WEB_TEXTS[0].encode())  # one id per byte, nothing in front
    assert bridge.tokenizer.decode(data.examples[0].input_ids) == WEB_TEXTS[0]


@pytest.fixture(scope="module")
def smollm2():
    from emlens import load_model

    return load_model("smollm2")


@pytest.mark.integration
def test_plain_text_on_the_default_model_has_no_chat_token_in_front(smollm2):
    from emlens.models import load_hf

    _, own = load_hf("smollm2")  # AutoTokenizer on its own
    data = TokenDataset.from_texts(smollm2.tokenizer, WEB_TEXTS)
    for text, example in zip(WEB_TEXTS, data.examples):
        assert example.input_ids == own(text)["input_ids"]
    assert "<|im_start|>" not in smollm2.tokenizer.decode(data.examples[0].input_ids)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["vector", "adapter"])
def test_pretraining_kl_on_the_default_model_equals_plain_transformers(smollm2, kind):
    """KL(p_base ‖ p_steered) per real token, computed with plain transformers and the model's own tokenizer."""
    from emlens.models import load_hf

    hf, own = load_hf("smollm2")
    layer = 15
    gen = torch.Generator().manual_seed(0)
    if kind == "vector":
        intervention: Intervention = SteeringVector(layer, 576, init=torch.randn(576, generator=gen) / 256)
        hook_module = hf.model.layers[layer]

        def edit(module, args, out):
            vec = intervention.effective.detach()
            return (out[0] + vec, *out[1:]) if isinstance(out, tuple) else out + vec

    else:
        intervention = RankOneAdapter.for_model(smollm2, layer, seed=0)
        with torch.no_grad():
            intervention.b.copy_(torch.randn(576, generator=gen) * 0.01)
        hook_module = hf.model.layers[layer].mlp.down_proj
        delta = intervention.scale * torch.outer(intervention.b.detach(), intervention.a.detach())

        def edit(module, args, out):
            return out + F.linear(args[0], delta)

    norm = intervention.norm
    total, count = 0.0, 0
    with torch.no_grad():
        for text in WEB_TEXTS:
            ids = own(text, return_tensors="pt")["input_ids"]
            base = F.log_softmax(hf(input_ids=ids).logits[0].double(), -1)
            handle = hook_module.register_forward_hook(edit)
            try:
                steered = F.log_softmax(hf(input_ids=ids).logits[0].double(), -1)
            finally:
                handle.remove()
            total += float((base.exp() * (base - steered)).sum())
            count += ids.shape[1]
    expected = total / count
    texts = TokenDataset.from_texts(smollm2.tokenizer, WEB_TEXTS)
    got = pretraining_significance(smollm2, {kind: intervention}, texts, [norm], progress=False)[kind][0]
    assert got == pytest.approx(expected, rel=1e-3)


# --- 2. the plan says which path computed the preference margins ----------------------------------


def test_preference_margins_record_their_plan(model):
    from emlens.preference import PairedSet, paired_margins

    data = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS, max_length=128)
    vector = SteeringVector(1, model.cfg.d_model, init=torch.ones(model.cfg.d_model) / 256)
    evaluate_loss(model, data, vector)
    assert runner_for(model).last_plan.path == "offset"
    adapter = RankOneAdapter.for_model(model, 2, seed=0)
    pairs = PairedSet("toy", ["q"] * len(data), data, data, list(range(len(data))))
    paired_margins(model, pairs, adapter)
    plan = runner_for(model).last_plan
    assert plan.path == "prefix" and plan.cut == 2, plan.describe()


def test_preference_nlls_equal_a_plain_forward(model):
    """The margins now run through the runner; they still equal a plain forward of the bridge with the hook on."""
    from emlens.preference import example_nlls

    data = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS, max_length=128)
    vector = SteeringVector(1, model.cfg.d_model, init=torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1)) / 100)
    got = example_nlls(model, data, vector)
    with torch.no_grad(), model.hooks(fwd_hooks=vector.fwd_hooks()):
        for i, example in enumerate(data.examples):
            ids = torch.tensor([example.input_ids])
            logits = model(ids)[0, :-1]
            mask = torch.tensor(example.loss_mask[1:])
            want = F.cross_entropy(logits[mask], ids[0, 1:][mask])
            assert float(got[i]) == pytest.approx(float(want), rel=1e-5)


# --- 3. TrainConfig.max_length acts in the Python API -----------------------------------------------

LONG = [[{"role": "user", "content": "Tell me about rivers " * 4}, {"role": "assistant", "content": "Rivers carry water downhill. " * 8}]] * 4


def test_train_config_max_length_cuts_the_examples(model):
    full = TokenDataset.from_conversations(model.tokenizer, LONG, max_length=512)
    short = TokenDataset.from_conversations(model.tokenizer, LONG, max_length=120)
    settings = dict(lr=1e-3, max_steps=1, batch_size=2, grad_accum=1, warmup_steps=0, progress=False)
    via_config = train(model, SteeringVector.for_model(model, 1), full, TrainConfig(max_length=120, **settings))
    via_data = train(model, SteeringVector.for_model(model, 1), short, TrainConfig(max_length=512, **settings))
    untouched = train(model, SteeringVector.for_model(model, 1), full, TrainConfig(max_length=512, **settings))
    assert via_config.losses[0]["sft"] == pytest.approx(via_data.losses[0]["sft"], rel=1e-6)
    assert via_config.losses[0]["sft"] != pytest.approx(untouched.losses[0]["sft"], rel=1e-3)


def test_truncation_by_max_length_is_reported(model):
    mixed = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS[:2] + LONG[:1], max_length=512)
    with pytest.warns(TruncationWarning, match=r"training set: 1 of 3 examples .* max_length=70 .*row 2"):
        cut = mixed.truncated(70, "training set")
    assert len(cut) == 2 and cut.longest <= 70 and cut.dropped_rows == [2]
    with pytest.raises(Exception, match="no example keeps a scored token"):
        TokenDataset.from_conversations(model.tokenizer, LONG, max_length=512).truncated(30, "training set")


# --- 5. a resumed continuation keeps its step labels -------------------------------------------------


def _cfg(**kw):
    base = dict(lr=5e-3, max_steps=6, batch_size=2, grad_accum=1, warmup_steps=1, checkpoint_every=2, progress=False, seed=1)
    return TrainConfig(**{**base, **kw})


def test_resumed_continuation_numbers_its_steps_after_the_first_phase(model, tmp_path):
    data = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS, max_length=128)
    first = train(model, SteeringVector.for_model(model, 1), data, _cfg(max_steps=4))

    def snapshot(result):
        return type(result)(result.intervention.clone(), result.config, list(result.losses), list(result.trajectory))

    straight = train(model, first.intervention.clone(), data, _cfg(), resume_from=snapshot(first), run_dir=tmp_path / "a")

    def stop(step, record):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, first.intervention.clone(), data, _cfg(), resume_from=snapshot(first), run_dir=tmp_path / "b", on_step=stop)
    # the CLI resumes an interrupted continuation in place, without the earlier result
    resumed = train(model, first.intervention.clone(), data, _cfg(), run_dir=tmp_path / "b", resume=True)
    assert [r["step"] for r in resumed.losses] == list(range(1, 11)) == [r["step"] for r in straight.losses]
    assert [s for s, _ in resumed.trajectory] == [s for s, _ in straight.trajectory] == [0, 2, 4, 6, 8, 10]


# --- 6. a step that cannot move the intervention stops the run ----------------------------------------


def test_a_huge_kl_weight_stops_instead_of_training_nothing(model):
    data = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS, max_length=128)
    alt = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS[::-1], max_length=128)
    vec = SteeringVector(1, model.cfg.d_model, init=torch.full((model.cfg.d_model,), 1e-3))
    with pytest.raises(NonFiniteError, match="optimiser"):
        train(model, vec, data, _cfg(kl_weight=1e30, kl_batch_size=2), kl_dataset=alt)


# --- 7. a grid point's value does not depend on the rest of the grid --------------------------------


def test_stability_value_at_an_epsilon_does_not_depend_on_the_grid(model, dataset):
    vec = SteeringVector(1, model.cfg.d_model, init=torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2)) / 50)
    a = stability(model, vec, dataset, [0.0, 0.5], seeds=[0, 1], progress=False)
    b = stability(model, vec, dataset, [0.5, 0.1, 0.3], seeds=[0, 1], progress=False)
    assert b.epsilons == [0.0, 0.1, 0.3, 0.5]
    assert a.losses[:, 1] == pytest.approx(b.losses[:, 3], rel=1e-6)
    with pytest.raises(ConfigError, match="0.5 more than once"):
        stability(model, vec, dataset, [0.5, 0.1, 0.5, 0.0], progress=False)
    with pytest.raises(ConfigError, match="more than once"):
        efficiency(model, vec, dataset, [0.0, 1.0, 1.0], progress=False)


def test_zero_interventions_are_refused_by_the_metrics(model, dataset):
    zero = SteeringVector.for_model(model, 1)
    for call in (
        lambda: stability(model, zero, dataset, progress=False),
        lambda: efficiency(model, zero, dataset, [0.0, 1.0], progress=False),
        lambda: pretraining_significance(model, {"z": zero}, dataset, [0.0, 1.0], progress=False),
    ):
        with pytest.raises(ValueError, match="norm 0"):
            call()


# --- 9. nested applied() ------------------------------------------------------------------------------


def test_nested_applied_of_one_intervention_is_refused(model, dataset):
    vec = SteeringVector(1, model.cfg.d_model, init=torch.ones(model.cfg.d_model) / 256)
    with vec.applied(model):
        with pytest.raises(InterventionError, match="already applied"):
            with vec.applied(model):
                pass
        with pytest.raises(InterventionError, match="already applied"):
            evaluate_loss(model, dataset, vec)
    with vec.applied(model):  # usable again once the block is left
        pass


# --- 10. contradictory metadata -----------------------------------------------------------------------


def test_a_file_whose_layer_and_hook_disagree_is_refused(model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = SteeringVector(2, model.cfg.d_model).save(tmp_path / "v.safetensors")
    meta = SteeringVector(2, model.cfg.d_model).metadata() | {"layer": 3}
    save_file(load_file(str(path)), str(path), metadata={"emlens": json.dumps(meta)})
    with pytest.raises(InterventionError, match=r"blocks\.2\.hook_resid_post.*layer 2.*layer 3"):
        Intervention.load(path)
    with pytest.raises(InterventionError, match="layer 3"):
        SteeringVector(3, model.cfg.d_model, hook="blocks.2.hook_resid_post")


def test_a_vector_whose_norm_overflows_names_its_file(model, tmp_path):
    path = SteeringVector(1, model.cfg.d_model, init=torch.full((model.cfg.d_model,), 1e30)).save(tmp_path / "huge.safetensors")
    with pytest.raises(InterventionError, match="huge.safetensors.*overflows"):
        Intervention.load(path)


# --- the smaller findings -------------------------------------------------------------------------------


def test_garbage_run_json_names_the_file(model, dataset, tmp_path):
    run = tmp_path / "run"

    def stop(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, SteeringVector.for_model(model, 1), dataset, _cfg(), run_dir=run, on_step=stop)
    (run / "checkpoint" / "run.json").write_text("{not json")
    with pytest.raises(RunCheckpointError, match=r"run\.json cannot be read"):
        train(model, SteeringVector.for_model(model, 1), dataset, _cfg(), run_dir=run, resume=True)


def test_two_runs_cannot_share_a_directory_at_once(model, dataset, tmp_path):
    first = RunCheckpoints(tmp_path, _cfg(), SteeringVector.for_model(model, 1), model, dataset, None, False)
    try:
        with pytest.raises(RunCheckpointError, match="another training run is using"):
            RunCheckpoints(tmp_path, _cfg(), SteeringVector.for_model(model, 1), model, dataset, None, False)
    finally:
        first.close()
    RunCheckpoints(tmp_path, _cfg(), SteeringVector.for_model(model, 1), model, dataset, None, False).close()  # free again


# --- documented behaviour, pinned -------------------------------------------------------------------------


def test_losses_are_token_pooled_not_row_averaged(model):
    short = [CONVERSATIONS[1]]
    long = [CONVERSATIONS[2]]
    both = TokenDataset.from_conversations(model.tokenizer, short + long, max_length=128)
    vec = SteeringVector(1, model.cfg.d_model, init=torch.ones(model.cfg.d_model) / 500)
    parts = [TokenDataset.from_conversations(model.tokenizer, rows, max_length=128) for rows in (short, long)]
    losses = [evaluate_loss(model, p, vec) for p in parts]
    counts = [p.n_scored_tokens for p in parts]
    pooled = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    assert evaluate_loss(model, both, vec) == pytest.approx(pooled, rel=1e-5)
    assert abs(pooled - sum(losses) / 2) > 1e-4  # the two poolings differ here, so the check above tells them apart


def test_adapter_noise_keeps_the_norm_and_rotates_by_one_minus_eps_squared(model):
    adapter = RankOneAdapter.for_model(model, 1, seed=0)
    with torch.no_grad():
        adapter.b.copy_(torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0)))
    vector = SteeringVector(1, model.cfg.d_model, init=torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)))
    for eps in (0.3, 0.6):
        noisy = adapter.perturbed(eps, torch.Generator().manual_seed(1))
        assert noisy.norm == pytest.approx(adapter.norm, rel=1e-4)
        cos = float(F.cosine_similarity(noisy.delta_weight().flatten(), adapter.delta_weight().flatten(), dim=0))
        assert cos == pytest.approx(1 - eps**2, abs=1e-4)
        moved = vector.perturbed(eps, torch.Generator().manual_seed(1))
        assert float(F.cosine_similarity(moved.effective.detach(), vector.effective.detach(), dim=0)) == pytest.approx((1 - eps**2) ** 0.5, abs=1e-4)


def test_vector_norm_is_the_effective_vectors_and_gradients_are_for_the_stored_one(model, dataset):
    vec = SteeringVector(1, model.cfg.d_model, alpha=256.0, init=torch.ones(model.cfg.d_model) / 1000)
    assert vec.norm == pytest.approx(float((256.0 * vec.vector.detach()).norm()), rel=1e-6)
    batch = next(dataset.batches(4))
    runner = runner_for(model)
    plan = runner.plan(vec)
    with runner.applied(vec, plan):
        logits = runner.logits(batch, batch.scored_positions, vec, plan)
    F.cross_entropy(logits, batch.scored_targets).backward()
    # reference: the effective vector as a leaf of its own, added by a plain TransformerLens hook
    effective = (256.0 * vec.vector.detach()).clone().requires_grad_(True)
    with model.hooks(fwd_hooks=[(vec.hook, lambda act, hook: act + effective)]):
        ref = model(batch.input_ids, attention_mask=batch.attention_mask)[batch.scored_positions]
    F.cross_entropy(ref, batch.scored_targets).backward()
    torch.testing.assert_close(vec.vector.grad, 256.0 * effective.grad, rtol=1e-4, atol=1e-6)


def test_example_nll_sweep_equals_a_plain_forward_per_point(model):
    """The preference table shares the work below the solutions; each point still equals a plain hooked forward."""
    from emlens.runner.measure import example_nll_sweep

    data = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS, max_length=128)
    gen = torch.Generator().manual_seed(3)
    points = [None, *(SteeringVector(1, model.cfg.d_model, init=torch.randn(model.cfg.d_model, generator=gen) / 80) for _ in range(2))]
    got = example_nll_sweep(model, data, points, batch_size=3)
    assert runner_for(model).last_plan.path == "offset"
    for k, point in enumerate(points):
        hooks = point.fwd_hooks() if point is not None else []
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            for i, example in enumerate(data.examples):
                ids = torch.tensor([example.input_ids])
                mask = torch.tensor(example.loss_mask[1:])
                want = F.cross_entropy(model(ids)[0, :-1][mask], ids[0, 1:][mask])
                assert float(got[k, i]) == pytest.approx(float(want), rel=1e-5)
