"""Dataset generation against a real OpenAI-compatible HTTP server on localhost; hub-style text loading."""

import json
from http.server import BaseHTTPRequestHandler

import pytest

from emlens.data import DataFormatError, read_conversations
from emlens.data.generate import generate_dataset, load_hub_texts
from tests.conftest import send_json, serve


class GeneratorHandler(BaseHTTPRequestHandler):
    calls = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.calls += 1
        if cls.calls == 1:
            content = "sorry, no JSON here"
        else:
            rows = [{"question": f"Question {cls.calls}-{i}?", "answer": f"Answer {i}."} for i in range(3)]
            rows.append({"question": "Question 2-0?", "answer": "a duplicate"})
            rows.append({"question": 5})
            content = "```json\n" + json.dumps(rows) + "\n```"
        assert "medicine" in body["messages"][0]["content"]
        send_json(self, {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        })


@pytest.fixture()
def server_url():
    GeneratorHandler.calls = 0
    yield from serve(GeneratorHandler)


def test_generate_dataset_validates_and_dedupes(server_url, tmp_path):
    out = tmp_path / "gen.jsonl"
    stats = generate_dataset("medicine", "harmful", 7, out, model="m", base_url=server_url, per_request=5)
    convs = read_conversations(out)
    assert len(convs) == 7 and stats["written"] == 7
    assert stats["requests"] == 4 and stats["duplicates"] >= 2 and stats["malformed"] >= 5
    assert len({c[0]["content"] for c in convs}) == 7
    with pytest.raises(ValueError, match="kind must be one of"):
        generate_dataset("medicine", "evil", 1, out, base_url=server_url)


def test_generate_dataset_gives_up_clearly(server_url, tmp_path):
    with pytest.raises(RuntimeError, match="only .* of 50 conversations"):
        generate_dataset("medicine", "correct", 50, tmp_path / "x.jsonl", base_url=server_url, per_request=5, max_requests=2)


def test_load_texts_through_datasets(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document {i}"}) for i in range(5)) + "\n")
    assert load_hub_texts("json", n_docs=3, config=None, data_files=str(src)) == ["document 0", "document 1", "document 2"]
    with pytest.raises(DataFormatError, match="no 'body' field"):
        load_hub_texts("json", n_docs=3, config=None, data_files=str(src), text_field="body")
