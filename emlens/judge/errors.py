"""What can go wrong while judging: each error names the endpoint or file and what to do."""


class JudgeError(RuntimeError):
    """The judge could not produce a score (the message names the endpoint and what to do)."""


class JudgeResponseError(JudgeError):
    """The server answered, but with something that is not an OpenAI chat completion."""


class JudgeUnavailableError(JudgeError):
    """The server kept failing (HTTP 5xx, refused connections, timeouts, a long 429)."""


class SplitNumberError(JudgeError):
    """The judge writes numbers as several tokens and a reply cannot be scored exactly."""


class JudgeFileError(ValueError):
    """A judge prompt file, answers file or judged-answers file is malformed or does not match."""
