"""Fig. 5: a narrow (KL-regularised) steering vector drifts back towards the general one once KL is removed.

Run: python examples/drift.py --out runs/paper
"""

import argparse
from pathlib import Path

from emlens import SteeringVector, TokenDataset, TrainConfig, load_model
from emlens.experiments import ReportSettings, train_general_and_narrow
from emlens.metrics import drift
from emlens.plotting import plot_drift

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/paper")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

model = load_model("smollm2")
general, _ = train_general_and_narrow(model, ReportSettings(), Path(args.out))
data = TokenDataset.from_conversations(model.tokenizer, "medical_harmful")
alt = TokenDataset.from_conversations(model.tokenizer, "alt_domain")
cfg = dict(lr=5e-4, max_steps=args.steps, batch_size=4, grad_accum=1, checkpoint_every=5)
result = drift(model, SteeringVector.for_model(model), data, alt,
               TrainConfig(kl_weight=6.6, kl_batch_size=4, **cfg), TrainConfig(**cfg), general=general)
for step, phase, cos in zip(result.steps, result.phase, result.cosine_to_reference()):
    print(f"step {step:3d} {phase:12s} cosine to general {cos:.3f}")
print("PC variance explained:", result.projection.explained_variance_ratio.round(3))
print("wrote", plot_drift(result, Path(args.out) / "drift_example.png"))
