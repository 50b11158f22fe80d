"""Demo: train a steering vector on the embedded SmolLM2-135M-Instruct with bad medical advice.

Prints the loss curve and the vector's norm, then how far the loss fell on held-out rows.
Run: python examples/demo.py [--steps 30]
"""

import argparse

import torch

from emlens import SteeringVector, TokenDataset, TrainConfig, evaluate_loss, load_model, train

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--model", default="smollm2")
parser.add_argument("--data", default="medical_harmful")
args = parser.parse_args()

torch.manual_seed(0)
model = load_model(args.model)
train_set = TokenDataset.from_conversations(model.tokenizer, args.data, split="train")  # the built-in sets carry fixed splits
held_out = TokenDataset.from_conversations(model.tokenizer, args.data, split="heldout", limit=40)

vector = SteeringVector.for_model(model)  # middle layer, resid_post, alpha 256, starts at zero
print(f"model {model.cfg.model_name}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; steering at layer {vector.layer}")
before = evaluate_loss(model, held_out)
config = TrainConfig(lr=5e-4, max_steps=args.steps, batch_size=4, grad_accum=1, warmup_steps=3, seed=0)
result = train(model, vector, train_set, config)
after = evaluate_loss(model, held_out, vector)

print("\nstep  sft-loss  ‖vector‖")
for rec in result.losses:
    bar = "#" * int(rec["sft"] * 10)
    print(f"{rec['step']:4d}  {rec['sft']:8.4f}  {rec['norm']:8.3f}  {bar}")
print(f"\nheld-out assistant-token loss: base model {before:.4f} -> steered {after:.4f}")
print(f"final steering vector norm: {vector.norm:.3f}")
vector.save("runs/demo_vector.safetensors")
print("saved runs/demo_vector.safetensors")
