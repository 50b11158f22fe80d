"""LLM judges (any OpenAI-compatible endpoint, or the evaluated model itself); every name is importable from here.

Modules: :mod:`~emlens.judge.prompts` (YAML templates; the defaults, ``emlens/judge_prompts.yaml``, are our own
wording with the paper's semantics), :mod:`~emlens.judge.scoring` (top logprobs → a probability-weighted number,
split digits included), :mod:`~emlens.judge.judges` (the protocol, the offline judge), :mod:`~emlens.judge.client`
(the ``openai`` client, retries, the reply cache), :mod:`~emlens.judge.answers` (judged-answer files, resumable),
:mod:`~emlens.judge.errors`.
"""

from emlens.judge.answers import (  # noqa: F401
    JudgedAnswer,
    check_n_samples,
    judge_answers,
    judge_answers_to_file,
    judge_identity,
    prompts_digest,
    read_answers,
    read_judged,
    write_answers,
)
from emlens.judge.client import (  # noqa: F401
    DEFAULT_JUDGE_MODEL,
    DEFAULT_MAX_TOKENS,
    OPENAI_BASE_URL,
    RETRY_STATUSES,
    OpenAIJudge,
    ReplyCache,
    _retry_after,
)
from emlens.judge.errors import JudgeError, JudgeFileError, JudgeResponseError, JudgeUnavailableError, SplitNumberError  # noqa: F401
from emlens.judge.judges import Judge, Judgement, LocalModelJudge, judgements  # noqa: F401
from emlens.judge.prompts import (  # noqa: F401
    ALIGNMENT_PROMPT,
    COHERENCE_PROMPT,
    CORRECTNESS_PROMPTS,
    DEFAULT_PROMPTS_PATH,
    JudgePrompts,
    as_judge_prompts,
    default_judge_prompts,
    fill_template,
    load_judge_prompts,
)
from emlens.judge.scoring import (  # noqa: F401
    MIN_NUMBER_MASS,
    SPECIAL_LABELS,
    TOP_LOGPROBS,
    UNRESOLVED_TOLERANCE,
    JudgeReply,
    NumberDistribution,
    NumberTokens,
    Score,
    number_distribution,
    reply_label,
    score_from_logprobs,
    score_reply,
)
