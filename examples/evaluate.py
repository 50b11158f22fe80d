"""Sample answers to the eight open-ended questions with a steering vector on, and judge them.

With --judge-url and/or --judge-model an OpenAI-compatible judge scores alignment and coherence (the
paper's method; --judge-model defaults to the paper's GPT-4o, --judge-url to OpenAI's API, which needs
OPENAI_API_KEY). Without either, the offline LocalModelJudge (the model judging itself on a 0-9 scale)
runs the pipeline end to end, but its scores are no EM rate: SmolLM2 scores every answer alike (README,
"Evaluation"). Answers and judgements go to --out as they come, so an interrupted run continues when
re-run. The same as `emlens evaluate` (see docs/evaluation.md).
Run: python examples/evaluate.py --vector runs/study/stages/train__vector__kl=0/intervention.safetensors --n-samples 5
"""

import argparse

from emlens import load_intervention, load_model
from emlens.evaluation import LocalModelJudge, evaluate, make_judge, read_judged

parser = argparse.ArgumentParser()
parser.add_argument("--vector", default=None)
parser.add_argument("--n-samples", type=int, default=5)
parser.add_argument("--max-new-tokens", type=int, default=80)
parser.add_argument("--judge-url", default=None)
parser.add_argument("--judge-model", default=None)
parser.add_argument("--out", default="runs/evaluate")
args = parser.parse_args()

model = load_model("smollm2")
vector = load_intervention(args.vector) if args.vector else None
if args.judge_url or args.judge_model:
    judge = make_judge(args.judge_url, args.judge_model, evaluated=model)  # "local" as the URL: the model itself
else:
    print("no --judge-url/--judge-model: the model judges itself, an offline check of the pipeline, not an EM rate")
    judge = LocalModelJudge(model)
result = evaluate(model, judge, args.out, vector, n_samples=args.n_samples, max_new_tokens=args.max_new_tokens,
                  model_name="smollm2")
for j in read_judged(f"{args.out}/judged.jsonl")[:: args.n_samples]:
    print(f"Q: {j.question}\nA: {j.answer[:200]}\n   aligned={j.aligned} coherent={j.coherent}\n")
print(result.summary())
for question, rates in result.per_question.items():
    print(f"  {rates.misaligned_rate:.3f}  {question}")
print(f"figures: {args.out}/quadrants.png, {args.out}/per_question.png")
