"""Reproduce the paper's metric figures on the default model: general vs narrow steering vectors.

Trains a general (no KL) and a narrow (KL-regularised) steering vector on bad medical advice,
then measures efficiency (Fig. 4a), stability (Fig. 4b), pre-training significance (Fig. 6) and
drift without KL (Fig. 5). Writes PNGs and results.json to --out and prints a summary table.
Run: python examples/paper_metrics.py --out runs/paper   (about 15 minutes on 2 CPU cores)
"""

import argparse

from emlens import load_model
from emlens.experiments import ReportSettings, markdown_table, paper_report

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2")
parser.add_argument("--out", default="runs/paper")
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--domain", default="medical_harmful")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

model = load_model(args.model, device=args.device)
results = paper_report(model, ReportSettings(domain_data=args.domain, steps=args.steps), args.out)
print(markdown_table(results))
print(f"figures and results.json written to {args.out}")
