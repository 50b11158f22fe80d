"""LLM judges (any OpenAI-compatible endpoint, or the evaluated model itself); every name is importable from here.

Modules: :mod:`~emlens.judge.prompts` (YAML templates; the defaults, ``emlens/judge_prompts.yaml``, are our own
wording with the paper's semantics), :mod:`~emlens.judge.scoring` (top logprobs → a probability-weighted number,
split digits included), :mod:`~emlens.judge.judges` (the protocol, the offline judge), :mod:`~emlens.judge.client`
(the ``openai`` client, retries, the reply cache), :mod:`~emlens.judge.answers` (judged-answer files, resumable),
:mod:`~emlens.judge.errors`.
"""

# isort: off
from emlens.judge.answers import JudgedAnswer, judge_answers, judge_answers_to_file, judge_identity  # noqa: F401
from emlens.judge.answers import judge_scoring, prompts_digest, read_answers, read_judged, responding_model, write_answers  # noqa: F401
from emlens.judge.client import DEFAULT_JUDGE_MODEL, DEFAULT_MAX_TOKENS, OPENAI_BASE_URL, RETRY_STATUSES, OpenAIJudge  # noqa: F401
from emlens.judge.client import ReplyCache, _retry_after, default_cache_path  # noqa: F401
from emlens.judge.errors import JudgeError, JudgeFileError, JudgeResponseError, JudgeUnavailableError, SplitNumberError  # noqa: F401
from emlens.judge.judges import Judge, Judgement, LocalModelJudge, judgements  # noqa: F401
from emlens.judge.prompts import ALIGNMENT_PROMPT, COHERENCE_PROMPT, CORRECTNESS_PROMPTS, DEFAULT_PROMPTS_PATH, JudgePrompts  # noqa: F401
from emlens.judge.prompts import as_judge_prompts, default_judge_prompts, fill_template, load_judge_prompts  # noqa: F401
from emlens.judge.scoring import MIN_NUMBER_MASS, SCORING_RULE, SPECIAL_LABELS, TOP_LOGPROBS, UNRESOLVED_TOLERANCE, JudgeReply  # noqa: F401
from emlens.judge.scoring import NumberDistribution, NumberTokens, Score, number_distribution, reply_label  # noqa: F401
from emlens.judge.scoring import score_from_logprobs, score_reply  # noqa: F401
from emlens.validation import check_n_samples  # noqa: F401
