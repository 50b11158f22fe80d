"""Fig. 4b: stability of general vs narrow steering vectors under orthogonal noise, at equal norm.

Run: python examples/stability.py --out runs/paper
"""

import argparse
from pathlib import Path

from emlens import TokenDataset, load_model
from emlens.experiments import ReportSettings, train_general_and_narrow
from emlens.metrics import stability
from emlens.plotting import plot_stability

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/paper")
parser.add_argument("--rows", type=int, default=40)
args = parser.parse_args()

model = load_model("smollm2")
general, narrow = train_general_and_narrow(model, ReportSettings(), Path(args.out))
data = TokenDataset.from_conversations(model.tokenizer, "medical_harmful").subset(range(args.rows))
norm = min(general.norm, narrow.norm)
eps = [0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]
results = {name: stability(model, vec.scaled_to(norm), data, eps, seeds=[0, 1, 2]) for name, vec in [("general", general), ("narrow", narrow)]}
for name, res in results.items():
    print(name, "relative loss:", " ".join(f"{e:g}:{r:.1f}" for e, r in zip(res.epsilons, res.relative().mean(0))))
print("wrote", plot_stability(results, Path(args.out) / "stability_example.png"))
