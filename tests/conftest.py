"""Shared test fixtures: offline hub, one tiny-model cache per session, a tiny pipeline factory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest

from browser import browser_page  # noqa: F401  (the headless-Chromium fixture)

os.environ["HF_HUB_OFFLINE"] = "1"
# The tiny models gain nothing from intra-op threads, and on a shared 2-core machine torch's
# thread pool made the suite 3-4x slower (busy-waiting threads); set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Point DIFFALIGN_CACHE at one folder for the whole session (subprocesses inherit it), so the
    tiny models build once and the user's own cache is never touched."""
    previous = os.environ.get("DIFFALIGN_CACHE")
    os.environ["DIFFALIGN_CACHE"] = str(tmp_path_factory.mktemp("diffalign-cache"))
    yield
    if previous is None:
        os.environ.pop("DIFFALIGN_CACHE", None)
    else:
        os.environ["DIFFALIGN_CACHE"] = previous


@pytest.fixture
def tiny_pipe():
    """Factory: ``tiny_pipe("tiny-sdxl")`` -> a fresh stock pipeline loaded from the tiny model's folder."""
    from diffusers import DiffusionPipeline

    from diffalign.pipelines.tiny import tiny_model_dir

    def make(name: str):
        pipe = DiffusionPipeline.from_pretrained(tiny_model_dir(name))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def run_two_processes(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Launch ``script args`` as two gloo CPU processes with accelerate (the flags that really
    start two; see OFFLINE.md). The tiny-model cache and offline settings are inherited."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A fresh HF_HOME: accelerate must not read the user's own default_config.yaml.
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HOME=tempfile.mkdtemp(prefix="hf-home-"))
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        script, *args,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
