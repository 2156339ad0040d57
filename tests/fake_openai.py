"""tests/fake_openai.py: a local OpenAI-compatible /chat/completions endpoint for tests; a function picks each answer."""
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class FakeOpenAI:
    """Serves POST .../chat/completions on 127.0.0.1 (a free port) until the `with` block ends.

    key(body) -> str names the item a request is about (e.g. the draft in the prompt); answer(item, n) -> (status,
    text) answers the n-th request for that item: 200 and the assistant's text, or an error status and its message
    (429 comes with Retry-After: 0). Records requests per item, Authorization headers, request bodies and the most
    requests in flight at once (each request is held for `delay` seconds so overlaps can be seen)."""

    def __init__(self, key, answer, delay: float = 0.0):
        self.key, self.answer, self.delay = key, answer, delay
        self.requests, self.lock, self.auth, self.bodies = Counter(), threading.Lock(), set(), []
        self.in_flight = self.max_in_flight = 0

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                item = fake.key(body)
                with fake.lock:
                    fake.requests[item] += 1
                    n = fake.requests[item]
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.auth.add(self.headers.get("Authorization"))
                    fake.bodies.append(body)
                time.sleep(fake.delay)
                status, text = fake.answer(item, n)
                with fake.lock:
                    fake.in_flight -= 1
                if status == 200:
                    payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}]}
                else:
                    payload = {"error": {"message": text or "try later", "type": "server", "code": status}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def __enter__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def local_only(monkeypatch, api_key: str | None = None) -> None:
    """No proxy between the client and 127.0.0.1; optionally the key the client reads from OPENAI_API_KEY."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    if api_key is not None:
        monkeypatch.setenv("OPENAI_API_KEY", api_key)


def prompt_text(body: dict) -> str:
    """The text part of the first message of a chat request."""
    return body["messages"][0]["content"][0]["text"]
