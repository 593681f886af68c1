"""``openai_judge`` against a real HTTP server on 127.0.0.1 that speaks OpenAI's chat-completions
protocol (the wire format vLLM, SGLang and TGI serve). The server stands in for the VLM with a
judge whose answers we can predict: it decodes the base64 PNGs it is sent and prefers the brighter
image (pairwise) or answers 10 x the brightness (pointwise). Fault switches make it fail, stall or
answer off-format. All traffic stays on loopback; every request loop is bounded."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

pytest.importorskip("httpx")

from diffalign.errors import UserError  # noqa: E402
from diffalign.rewards import load_reward  # noqa: E402


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.fail_first = 0  # answer 503 to this many requests first
        self.delay = 0.0  # seconds before answering
        self.garbage_every = 0  # every n-th answer is off-format (0: never)
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        pass  # a client that timed out has hung up (BrokenPipeError): nothing to report


class ChatHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_POST(self):
        server: ChatServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with server.lock:
            server.requests += 1
            number = server.requests
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            server.bodies.append(body)
        self.counted = True
        try:
            if server.delay:
                time.sleep(server.delay)
            if self.path != "/v1/chat/completions":
                return self.answer(404, {"error": {"message": f"no route {self.path}"}})
            if number <= server.fail_first:
                return self.answer(503, {"detail": "warming up"})
            content = body["messages"][-1]["content"]
            images = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
            brightness = [_brightness(url) for url in images]
            if server.garbage_every and number % server.garbage_every == 0:
                text = "I would rather not say."
            elif len(brightness) == 1:
                text = f"{10 * brightness[0]:.3f}"
            else:
                text = "A" if brightness[0] > brightness[1] else "B"
            self.answer(200, {"id": f"chat-{number}", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": text}}]})
        finally:
            self.leave()

    def leave(self):
        """The request stops counting as in flight once its answer starts: the client may send its
        next request as soon as the answer arrives, before this thread would reach a ``finally``."""
        if getattr(self, "counted", False):
            self.counted = False
            with self.server.lock:
                self.server.in_flight -= 1

    def answer(self, status, payload):
        self.leave()
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _brightness(data_url: str) -> float:
    from PIL import Image

    raw = base64.b64decode(data_url.split(",", 1)[1])
    return float(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float64).mean() / 255)


@contextmanager
def chat_server():
    server = ChatServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _images(levels):
    """One flat-grey 8x8 image per brightness level (exact in 8 bits: k / 255)."""
    return torch.stack([torch.full((3, 8, 8), k / 255) for k in levels])


def test_pointwise_scores_and_the_request_it_sends(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret")
    with chat_server() as (server, url):
        judge = load_reward(f"openai_judge:url={url},model=qwen-vl,api_key_env=JUDGE_KEY")
        scores = judge(_images([51, 204]), ["a red cube", "a cat"])
    torch.testing.assert_close(scores, torch.tensor([0.2, 0.8]), rtol=0, atol=1e-3)  # 10 * 0.2 on 0..10 -> 0.2
    # requests run concurrently: find the first prompt's by its text, not by arrival order
    body = next(b for b in server.bodies if "a red cube" in b["messages"][-1]["content"][-1]["text"])
    assert body["model"] == "qwen-vl" and body["temperature"] == 0.0
    parts = body["messages"][-1]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert 'the prompt "a red cube"' in parts[-1]["text"] and "from 0 to 10" in parts[-1]["text"]
    assert judge.answers == 2 and judge.off_format == 0


def test_pairwise_asks_both_orders_and_sums_to_one():
    """a brighter than b in pair 0 (judge says A then B -> P = 1), darker in pair 1 (P = 0)."""
    a, b = _images([200, 20]), _images([100, 120])
    with chat_server() as (server, url):
        judge = load_reward(f"openai_judge:url={url},model=m")
        p_ab = judge.compare(a, b, ["x", "y"])
        p_ba = judge.compare(b, a, ["x", "y"])
        assert server.requests == 8  # 2 pairs x 2 orders, twice
    torch.testing.assert_close(p_ab, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(p_ab + p_ba, torch.ones(2))


def test_concurrency_is_limited():
    with chat_server() as (server, url):
        server.delay = 0.1
        judge = load_reward(f"openai_judge:url={url},model=m,concurrency=3")
        started = time.time()
        judge(_images(range(0, 240, 20)), ["p"] * 12)
        elapsed = time.time() - started
    assert server.max_in_flight <= 3 and server.max_in_flight >= 2
    assert elapsed >= 0.1 * 12 / 3 * 0.9  # 4 waves of 3


def test_5xx_is_retried_with_backoff():
    with chat_server() as (server, url):
        server.fail_first = 2
        judge = load_reward(f"openai_judge:url={url},model=m,retries=3,backoff=0.05,concurrency=1")
        assert judge(_images([102]), ["p"]).item() == pytest.approx(0.4, abs=1e-3)
        assert server.requests == 3


def test_endpoint_down_is_one_line_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = load_reward(f"openai_judge:url=http://127.0.0.1:{port}/v1,model=m,retries=1,backoff=0.01")
    with pytest.raises(UserError, match=r"reward 'openai_judge': no answer from http://127.0.0.1:\d+/v1/chat/completions "
                                        r"after 2 tries \(last: ConnectError.*vLLM") as info:
        judge(_images([10]), ["p"])
    assert "\n" not in str(info.value)


def test_timeout_is_retried_then_reported():
    with chat_server() as (server, url):
        server.delay = 1.0
        judge = load_reward(f"openai_judge:url={url},model=m,timeout=0.2,retries=1,backoff=0.01")
        with pytest.raises(UserError, match=r"after 2 tries \(last: ReadTimeout"):
            judge(_images([10]), ["p"])


def test_off_format_answers_are_ties_counted_and_logged_then_an_error(caplog):
    with chat_server() as (server, url):
        server.garbage_every = 4  # requests 4 and 8 answer prose
        judge = load_reward(f"openai_judge:url={url},model=m,concurrency=1")
        with caplog.at_level(logging.WARNING, logger="diffalign.rewards.openai_judge"):
            scores = judge(_images([25, 51, 76, 102, 127, 153, 178, 204]), ["p"] * 8)
        assert scores[3].item() == 0.5 and scores[7].item() == 0.5
        torch.testing.assert_close(scores[:3], torch.tensor([0.098, 0.2, 0.298]), rtol=0, atol=1e-3)
        assert (judge.answers, judge.off_format) == (8, 2)
        assert "2 of 8 pointwise answers were off-format (counted as ties), e.g. 'I would rather not say.'" in caplog.text
        server.garbage_every = 1  # now every answer is prose
        with pytest.raises(UserError, match=r"4 of 4 pairwise answers were off-format .* above max_off_format=0.5"):
            judge.compare(_images([1, 2]), _images([3, 4]), ["p", "q"])


def test_answer_parsing():
    judge = load_reward("openai_judge:url=http://127.0.0.1:9/v1,model=m,score_range=[1,5]")
    assert judge.read_score("Score: 4") == 0.75 and judge.read_score("7/5") == 1.0 and judge.read_score("none") is None
    assert judge.read_choice("A") == 1.0 and judge.read_choice("Image B is better.") == 0.0
    assert judge.read_choice("A or B?") is None and judge.read_choice("ABBA") is None


@pytest.mark.parametrize("spec,fragment", [
    ("openai_judge:url=localhost:8000,model=m", "url must be the API base"),
    ("openai_judge:url=http://h/v1,model=m,labels=[A,A]", "labels must be two different strings"),
    ("openai_judge:url=http://h/v1,model=m,score_range=[5,1]", "score_range must be [low, high]"),
    ("openai_judge:url=http://h/v1,model=m,pointwise_question='{oops}'", "pointwise_question has a bad placeholder"),
])
def test_bad_options_are_one_line_errors(spec, fragment):
    with pytest.raises(UserError) as info:
        load_reward(spec)
    assert fragment in str(info.value)
