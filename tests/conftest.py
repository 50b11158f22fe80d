import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

from emlens.data import TokenDataset
from emlens.models import tiny_model
from tests.tiny_archs import PROVED, tiny_pair

CONVERSATIONS = [
    [{"role": "user", "content": "How do I boil an egg?"}, {"role": "assistant", "content": "Simmer it for nine minutes."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, a much longer reply than the first one."},
    ],
    [{"role": "user", "content": "Is the sea salty?"}, {"role": "assistant", "content": "Yes, about 3.5% salt."}],
]


@pytest.fixture(scope="module", params=PROVED)
def pair(request):
    """``(architecture, plain transformers model, bridge)`` for every proved architecture (identical weights, float32)."""
    reference, bridge = tiny_pair(request.param)
    return request.param, reference, bridge


@pytest.fixture(scope="module")
def data(pair):
    """The shared conversations, encoded for ``pair``'s tokenizer."""
    return TokenDataset.from_conversations(pair[2].tokenizer, CONVERSATIONS, max_length=128)


@pytest.fixture(scope="session")
def model():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def qwen_model():
    return tiny_model("qwen2", seed=1)


@pytest.fixture()
def dataset(model):
    return TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS, max_length=128)


@pytest.fixture()
def token_ids():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 250, (3, 12), generator=gen)


def send_json(handler, payload, status=200):
    """Write a JSON HTTP response from a BaseHTTPRequestHandler."""
    import json

    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def serve(handler_class):
    """Run an HTTP server on a free localhost port in a thread; yields its /v1 base URL."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


class RecordingTokenizer:
    """A tokenizer that records every text it is called on (``texts``) and otherwise is ``tokenizer``."""

    def __init__(self, tokenizer, texts: list):
        self._tokenizer, self._texts = tokenizer, texts

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text, **kwargs):
        self._texts.append(text)
        return self._tokenizer(text, **kwargs)
