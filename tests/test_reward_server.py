"""``diffalign serve-reward`` and the ``remote`` reward, on loopback only.

Servers run in a thread of the test process (uvicorn, the real FastAPI app) or, where a test kills
one, as a ``diffalign serve-reward`` subprocess. Every request loop is bounded and every wait has a
timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from diffalign.errors import UserError  # noqa: E402
from diffalign.rewards import Reward, load_reward, register_reward  # noqa: E402
from diffalign.rewards.remote import NPZ, decode_request, encode_request, parse_request, wire_to_images  # noqa: E402


class PromptLength(Reward):
    """brightness + len(prompt) / 100: a score that is wrong if a prompt reaches the wrong image."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__("prompt_length", differentiable=False, batch_size=None, weightless=True)
        self.delay = delay
        self.batch_sizes: list[int] = []

    def score_batch(self, images, prompts):
        self.batch_sizes.append(len(prompts))
        if self.delay:
            time.sleep(self.delay)
        return images.mean(dim=(1, 2, 3)) + torch.tensor([len(p) / 100 for p in prompts])


@register_reward("test_prompt_length", differentiable=False)
def _build_prompt_length(delay: float = 0.0, device: str | None = None) -> Reward:
    return PromptLength(delay)


@contextmanager
def served(reward, max_batch=32, max_wait_ms=5.0):
    """Serve ``reward`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    from diffalign.reward_server import bind_socket, create_app

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(reward, max_batch=max_batch, max_wait_ms=max_wait_ms),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield url, server
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def images(n, seed=0, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_wire_format_round_trips():
    """float32 npz is exact; uint8 npz and PNG both carry the 8-bit images a PNG file would hold."""
    x, y = images(3), images(3, seed=1)
    prompts = ["a", "bé", "a red cube"]
    body, kind = encode_request(x, prompts, y, "float32")
    a, p, b = decode_request(body, kind, pairwise=True)
    assert kind == NPZ and p == prompts and torch.equal(a, x) and torch.equal(b, y)
    quantised = (x * 255).round() / 255
    for encoding in ("uint8", "png"):
        a, p, b = decode_request(*encode_request(x, prompts, encoding=encoding), pairwise=False)
        assert p == prompts and b is None
        torch.testing.assert_close(a, quantised, rtol=0, atol=1e-6)
        assert a.is_contiguous()  # NCHW like an in-process caller's (channels-last was 2-3x slower to score)
        # the server's event loop parses without converting: the 8-bit pixels as sent, [B, H, W, 3]
        raw, _, _ = parse_request(*encode_request(x, prompts, encoding=encoding), pairwise=False)
        assert raw.dtype == torch.uint8 and raw.shape == (3, 16, 16, 3) and torch.equal(wire_to_images(raw), a)


def test_remote_scores_equal_in_process_scores():
    local = load_reward("brightness")
    x = images(6)
    prompts = [f"prompt {i}" for i in range(6)]
    with served(local) as (url, _):
        exact = load_reward(f"remote:url={url},encoding=float32")
        assert exact.served == "brightness"
        torch.testing.assert_close(exact(x, prompts), local(x, prompts), rtol=0, atol=0)
        torch.testing.assert_close(exact.compare(x, images(6, 1), prompts), local.compare(x, images(6, 1), prompts),
                                   rtol=0, atol=1e-7)
        compact = load_reward(f"remote:url={url},encoding=png,request_size=4")  # two requests, sent concurrently
        torch.testing.assert_close(compact(x, prompts), local((x * 255).round() / 255, prompts), rtol=0, atol=1e-6)


def test_eight_concurrent_clients_are_batched_together_and_each_gets_its_own_scores():
    reward = PromptLength(delay=0.05)
    start = threading.Barrier(8)
    results: dict[int, torch.Tensor] = {}
    with served(reward, max_batch=32, max_wait_ms=200) as (url, _):
        client = load_reward(f"remote:url={url},encoding=float32")

        def worker(k):
            prompts = ["x" * (k * 4 + j) for j in range(4)]
            start.wait(timeout=20)
            results[k] = client(images(4, seed=k), prompts)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        health = httpx.get(url + "/health", timeout=10).json()
    for k in range(8):
        expected = images(4, seed=k).mean(dim=(1, 2, 3)) + torch.tensor([(k * 4 + j) / 100 for j in range(4)])
        torch.testing.assert_close(results[k], expected)
    assert health["served_images"] == 32
    assert health["batches"] < 8 and max(reward.batch_sizes) > 4  # requests of several clients shared a call
    assert sum(reward.batch_sizes) == 32


def test_a_request_bigger_than_max_batch_is_split():
    reward = PromptLength()
    x = images(10)
    prompts = [f"p{i}" for i in range(10)]
    with served(reward, max_batch=4, max_wait_ms=0) as (url, _):
        scores = load_reward(f"remote:url={url},encoding=float32")(x, prompts)
        health = httpx.get(url + "/health", timeout=10).json()
    assert reward.batch_sizes == [4, 4, 2]
    assert health["batches"] == 3 and health["mean_batch_size"] == pytest.approx(10 / 3)
    torch.testing.assert_close(scores, PromptLength()(x, prompts))


def test_malformed_payloads_get_a_4xx_with_a_message_and_the_server_keeps_serving():
    with served(load_reward("brightness")) as (url, _):
        cases = [
            (b"not an archive", NPZ, "not a readable .npz archive"),
            (b"{", "application/json", "not valid JSON"),
            (json.dumps({"prompts": ["a"], "images": ["@@@"]}).encode(), "application/json", "images[0] is not a base64"),
            (b"x", "text/plain", "unsupported content type"),
            (encode_request(images(2), ["only one prompt", "b"])[0][:-10], NPZ, "npz"),
            (encode_request(images(2) * 3, ["a", "b"], encoding="float32")[0], NPZ, "must be in [0, 1]"),
        ]
        for body, kind, fragment in cases:
            response = httpx.post(url + "/score", content=body, headers={"content-type": kind}, timeout=10)
            assert response.status_code == 400, (fragment, response.text)
            assert fragment in response.json()["detail"]
        # two prompts for three images
        body, kind = encode_request(images(3), ["a", "b", "c"], encoding="uint8")
        import io

        import numpy as np

        archive = dict(np.load(io.BytesIO(body)))
        archive["prompts"] = archive["prompts"][:2]
        buffer = io.BytesIO()
        np.savez(buffer, **archive)
        response = httpx.post(url + "/score", content=buffer.getvalue(), headers={"content-type": NPZ}, timeout=10)
        assert response.status_code == 400 and "2 prompts for 3 images" in response.json()["detail"]
        # and the server still answers a good request
        assert load_reward(f"remote:url={url}")(images(2), ["a", "b"]).shape == (2,)


def test_a_4xx_from_the_server_is_a_one_line_user_error():
    with served(load_reward("brightness")) as (url, _):
        client = load_reward(f"remote:url={url},encoding=float32")
        with pytest.raises(UserError, match=r"refused the request \(HTTP 400\).*must be in \[0, 1\]") as info:
            client.score_batch = None  # forward goes straight to the server; check_images runs there
            client._call("score", images(2) * 3, ["a", "b"], None)
        assert "\n" not in str(info.value)


def test_no_server_is_a_one_line_error_after_the_retries():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    with pytest.raises(UserError, match=rf"no answer from http://127.0.0.1:{port}/health after 3 tries .*serve-reward"):
        load_reward(f"remote:url=http://127.0.0.1:{port},retries=2,backoff=0.05")
    assert time.time() - started >= 0.05 + 0.1  # backoff 0.05, then 0.1


def test_graceful_shutdown_answers_the_request_in_flight():
    reward = PromptLength(delay=0.5)
    with served(reward) as (url, server):
        client = load_reward(f"remote:url={url}")
        box = {}
        thread = threading.Thread(target=lambda: box.setdefault("scores", client(images(2), ["a", "b"])))
        thread.start()
        deadline = time.time() + 10
        while not reward.batch_sizes and time.time() < deadline:  # the request is being scored
            time.sleep(0.01)
        server.should_exit = True
        thread.join(timeout=20)
    assert box["scores"].shape == (2,)


def _grpo_config(out: Path, url: str) -> dict:
    return {
        "method": "grpo", "model": "tiny-sd", "output_dir": str(out), "seed": 0, "lora": {"rank": 4},
        "train": {"max_steps": 40, "learning_rate": 1e-3, "batch_size": 4, "checkpoint_every": 1,
                  "lr_scheduler": "constant"},
        "grpo": {"reward": f"remote:url={url},retries=2,backoff=0.1,timeout=5", "prompts": ["a red cube", "a cat"],
                 "num_steps": 2, "group_size": 2, "prompts_per_round": 2},
    }


def test_server_killed_mid_run_stops_training_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "diffalign.cli", "serve-reward", "brightness", "--port", "0",
                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    train = None
    try:
        banner = server.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", banner)
        assert match, banner
        config = tmp_path / "grpo.yaml"
        out = tmp_path / "run"
        config.write_text(json.dumps(_grpo_config(out, match.group(1))))
        train = subprocess.Popen([sys.executable, "-m", "diffalign.cli", "train", str(config)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step-2").is_dir():
            assert time.time() < deadline and train.poll() is None, "no checkpoint appeared"
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=20)
        stdout, stderr = train.communicate(timeout=120)
    finally:
        for process in (server, train):
            if process is not None and process.poll() is None:
                process.kill()
    assert train.returncode != 0
    last = stderr.strip().splitlines()[-1]  # the error is the last line printed, after the closed progress bar
    assert re.fullmatch(r"error: reward 'remote': no answer from http://127\.0\.0\.1:\d+/score after 3 tries "
                        r"\(last: ConnectError.*\); is `diffalign serve-reward` running there\?", last), stderr[-2000:]
    from diffalign.checkpoint import list_checkpoints

    steps = [int(p.name.split("-")[1]) for p in list_checkpoints(out / "checkpoints")]
    assert steps and max(steps) >= 2
    from safetensors.torch import load_file

    newest = out / "checkpoints" / f"step-{max(steps)}"
    assert load_file(str(newest / "lora.safetensors"))  # the LoRA of the last finished step
    assert json.loads((newest / "state.json").read_text())["step"] == max(steps)


def test_serve_reward_stops_on_sigterm_while_a_client_keeps_its_connection_open():
    """The CLI path: the reward runs on the main thread and the HTTP loop on another, so the
    main thread must notice a SIGTERM the kernel delivered to any thread."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "diffalign.cli", "serve-reward", "brightness", "--port", "0",
                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", server.stdout.readline())
        assert match
        client = load_reward(f"remote:url={match.group(1)},request_size=4")  # keeps its connections alive
        x = images(12)
        local = load_reward("brightness")((x * 255).round() / 255, [""] * 12)
        for _ in range(3):
            torch.testing.assert_close(client(x, [""] * 12), local, rtol=0, atol=1e-6)
        y = images(12, seed=1)
        expected = load_reward("brightness").compare((x * 255).round() / 255, (y * 255).round() / 255, [""] * 12)
        torch.testing.assert_close(client.compare(x, y, [""] * 12), expected, rtol=0, atol=1e-6)
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0 and "reward server stopped" in output
