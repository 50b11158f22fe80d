"""EM and narrow-misalignment rates of the base model and the general / narrow vectors from paper_metrics.py.

Samples answers to the 8 general and 8 medical questions and scores them with a judge: an
OpenAI-compatible one with --judge-model (the paper's method), otherwise the offline
LocalModelJudge (the model judging itself: a rough approximation, see emlens.evaluation).
Run: python examples/em_table.py --out runs/paper --n-samples 10
"""

import argparse
import json
from pathlib import Path

from emlens import load_intervention, load_model
from emlens.evaluation import (
    DOMAIN_QUESTIONS, GENERAL_QUESTIONS, LocalModelJudge, OpenAIJudge, judge_answers, misalignment_rates, sample_answers,
)

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/paper")
parser.add_argument("--n-samples", type=int, default=10)
parser.add_argument("--max-new-tokens", type=int, default=80)
parser.add_argument("--judge-url", default=None)
parser.add_argument("--judge-model", default=None)
args = parser.parse_args()

model = load_model("smollm2")
judge = OpenAIJudge(args.judge_model, base_url=args.judge_url) if args.judge_model else LocalModelJudge(model)
out = Path(args.out)
rows = {}
for name in ("base", "general", "narrow"):
    vec = None if name == "base" else load_intervention(out / f"{name}.safetensors")
    general = judge_answers(judge, sample_answers(model, GENERAL_QUESTIONS, vec, args.n_samples, args.max_new_tokens))
    medical = judge_answers(judge, sample_answers(model, DOMAIN_QUESTIONS["medical"], vec, args.n_samples, args.max_new_tokens), domain="medical")
    rows[name] = {"em": misalignment_rates(general).as_dict(), "narrow": misalignment_rates(medical).as_dict(),
                  "examples": [j.__dict__ for j in general[:: args.n_samples]]}
    g, m = rows[name]["em"], rows[name]["narrow"]
    print(f"{name}: EM {g['misaligned_rate']:.3f} {g['misaligned_ci']}, coherent {g['coherent_rate']:.3f}; "
          f"medical misalignment {m['misaligned_rate']:.3f} {m['misaligned_ci']}, coherent {m['coherent_rate']:.3f}", flush=True)
(out / "em_table.json").write_text(json.dumps(rows, indent=2))
