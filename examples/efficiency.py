"""Fig. 4a: efficiency of general vs narrow steering vectors (loss vs norm) on the default model.

Uses (or trains, ~3 min on CPU) the general and narrow vectors of examples/paper_metrics.py.
Run: python examples/efficiency.py --out runs/paper
"""

import argparse
from pathlib import Path

from emlens import TokenDataset, load_model
from emlens.experiments import ReportSettings, train_general_and_narrow
from emlens.metrics import efficiency, norm_grid
from emlens.plotting import plot_efficiency

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/paper")
parser.add_argument("--rows", type=int, default=40)
args = parser.parse_args()

model = load_model("smollm2")
general, narrow = train_general_and_narrow(model, ReportSettings(), Path(args.out))
data = TokenDataset.from_conversations(model.tokenizer, "medical_harmful").subset(range(args.rows))
norms = norm_grid([general, narrow], n_points=9)
curves = {"general": efficiency(model, general, data, norms), "narrow": efficiency(model, narrow, data, norms)}
for i, n in enumerate(norms):
    print(f"norm {n:6.2f}: general {curves['general'][i]:.4f}  narrow {curves['narrow'][i]:.4f}")
print("wrote", plot_efficiency(norms, curves, Path(args.out) / "efficiency_example.png"))
