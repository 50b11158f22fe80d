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
    data = TokenDataset.from_conversations(smollm2.tokenizer, "medical_harmful")
    train_set, held_out = data.subset(range(0, 40)), data.subset(range(290, 300))
    vec = SteeringVector.for_model(smollm2)
    before = evaluate_loss(smollm2, held_out)
    train(smollm2, vec, train_set, TrainConfig(lr=5e-4, max_steps=6, batch_size=4, grad_accum=1, warmup_steps=2, progress=False))
    assert evaluate_loss(smollm2, held_out, vec) < before
