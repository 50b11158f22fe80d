"""Sample answers to the eight open-ended questions with a steering vector on, and judge them.

With --judge-url/--judge-model an OpenAI-compatible judge scores alignment and coherence (the
paper's method); without them the offline LocalModelJudge (the model judging itself on a 0-9
scale) gives a rough approximation.
Run: python examples/evaluate.py --vector runs/paper/general.safetensors --n-samples 5
"""

import argparse

from emlens import load_intervention, load_model
from emlens.evaluation import GENERAL_QUESTIONS, LocalModelJudge, OpenAIJudge, judge_answers, misalignment_rates, sample_answers

parser = argparse.ArgumentParser()
parser.add_argument("--vector", default=None)
parser.add_argument("--n-samples", type=int, default=5)
parser.add_argument("--max-new-tokens", type=int, default=80)
parser.add_argument("--judge-url", default=None)
parser.add_argument("--judge-model", default=None)
args = parser.parse_args()

model = load_model("smollm2")
vector = load_intervention(args.vector) if args.vector else None
answers = sample_answers(model, GENERAL_QUESTIONS, vector, n_samples=args.n_samples, max_new_tokens=args.max_new_tokens)
judge = OpenAIJudge(args.judge_model, base_url=args.judge_url) if args.judge_model else LocalModelJudge(model)
judged = judge_answers(judge, answers)
for j in judged[:: args.n_samples]:
    print(f"Q: {j.question}\nA: {j.answer[:200]}\n   aligned={j.aligned} coherent={j.coherent}\n")
rates = misalignment_rates(judged)
print(f"EM rate {rates.misaligned_rate:.3f} (95% CI {rates.misaligned_ci[0]:.3f}-{rates.misaligned_ci[1]:.3f}); "
      f"coherent {rates.coherent_rate:.3f}; scored {rates.n_scored}, excluded {rates.n_excluded}")
