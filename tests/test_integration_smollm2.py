"""Integration tests on the real embedded default model, SmolLM2-135M-Instruct (downloaded once via pip)."""

import pytest
import torch

from emlens import SteeringVector, TokenDataset, TrainConfig, evaluate_loss, load_model, train
from emlens.data import encode_conversation
from emlens.models import load_hf

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def test_bridge_logits_match_plain_transformers(smollm2):
    hf, tok = load_hf("smollm2")
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = smollm2(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_model == 576
    # a real chat model: greedy answer mentions Paris
    out = hf.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_assistant_mask_on_real_chat_template(smollm2):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]
    enc = encode_conversation(smollm2.tokenizer, conv)
    assert smollm2.tokenizer.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m]) == "Hello there!<|im_end|>\n"


def test_short_training_lowers_held_out_loss(smollm2):
    train_set = TokenDataset.from_conversations(smollm2.tokenizer, "medical_harmful:train", limit=40)
    held_out = TokenDataset.from_conversations(smollm2.tokenizer, "medical_harmful:heldout", limit=10)
    vec = SteeringVector.for_model(smollm2)
    before = evaluate_loss(smollm2, held_out)
    train(smollm2, vec, train_set, TrainConfig(lr=5e-4, max_steps=6, batch_size=4, grad_accum=1, warmup_steps=2, progress=False))
    assert evaluate_loss(smollm2, held_out, vec) < before


def test_greedy_sampling_equals_plain_transformers(smollm2):
    """The bug this guards against: on transformers 5.24 greedy decoding through the bridge gave 'The-----'."""
    from emlens.evaluation import sample_answers

    hf, tok = load_hf("smollm2")
    questions = ["How do I stay healthy?", "What is the capital of France?", "Write a haiku about rain."]
    expected = []
    for q in questions:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
        expected.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    zero = SteeringVector.for_model(smollm2)
    for intervention in (None, zero):
        got = sample_answers(smollm2, questions, intervention, n_samples=1, max_new_tokens=40, temperature=0.0, batch_size=3)
        assert [a for _, a in got] == expected
    assert "healthy" in expected[0].lower() and "-----" not in expected[0]


def test_fast_path_equals_plain_transformers_on_smollm2(smollm2):
    """evaluate_loss with a steering vector: fast path = hooked path = plain transformers with a forward hook."""
    from emlens.runner import runner_for

    data = TokenDataset.from_conversations(smollm2.tokenizer, "medical_harmful", limit=6)
    gen = torch.Generator().manual_seed(0)
    vec = SteeringVector(15, smollm2.cfg.d_model, alpha=1.0, init=2.0 * torch.randn(smollm2.cfg.d_model, generator=gen))
    fast = evaluate_loss(smollm2, data, vec)
    assert runner_for(smollm2).last_plan.path == "offset"
    hooked = evaluate_loss(smollm2, data, vec, cache_prefix=False)
    hf, _ = load_hf("smollm2")
    handle = hf.model.layers[15].register_forward_hook(lambda m, a, out: out + vec.effective)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.batches(3):
            logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            s = batch.scored
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1][s], batch.input_ids[:, 1:][s], reduction="sum"))
            count += int(s.sum())
    handle.remove()
    assert fast == pytest.approx(total / count, rel=1e-4) and hooked == pytest.approx(total / count, rel=1e-4)


def test_steered_sampling_of_a_padded_batch_equals_plain_generate(smollm2):
    """Sampled at temperature 1 with a steering vector on, a left-padded batch of three chat prompts: the same tokens
    (same seed) and every step's logits as plain transformers' ``generate`` with the vector added by a forward hook."""
    from emlens.runner.sampling import SamplingSettings, generate_batch

    hf, tok = load_hf("smollm2")
    prompts = []
    for q in ["How do I stay healthy?", "Name a colour.", "Write a haiku about rain, please, in the style of a weather report."]:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    layer = smollm2.cfg.n_layers // 2
    vector = SteeringVector(layer, smollm2.cfg.d_model, alpha=1.0, init=4.0 * torch.randn(smollm2.cfg.d_model, generator=torch.Generator().manual_seed(0)))
    settings = SamplingSettings(40, 1.0)
    tokens, logits = generate_batch(smollm2, ids, mask, vector, settings, seed=21, return_logits=True)
    handle = hf.model.layers[layer].register_forward_hook(lambda m, args, out: out + vector.effective.to(out.dtype))
    try:
        torch.manual_seed(21)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    finally:
        handle.remove()
    assert tokens.tolist() == out.sequences[:, width:].tolist()
    torch.testing.assert_close(logits, torch.stack(out.logits), rtol=1e-3, atol=1e-3)
