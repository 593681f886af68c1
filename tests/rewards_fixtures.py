"""Fixtures for the reward tests: tiny random-weight scorers written once per session in the real
on-disk formats and loaded through ``load_reward``, exactly as a user's downloaded weights would be.

Test modules import what they use: ``from rewards_fixtures import tiny_options, tiny_rewards``, and
``single_thread`` (autouse once imported) to run the tiny models on one intra-op thread.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WEIGHTED = ("clip", "aesthetic", "hpsv2", "pickscore", "imagereward")  # pointwise, differentiable, with weights
PROMPTS = ["a red apple on a table", "a cat", "two dogs running on a beach at sunset", "an astronaut"]


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models on one thread: on a busy 2-core machine OpenMP's spinning threads made each call
    ~100x slower (3 ms -> 0.3 s). Restores the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_options(tmp_path_factory) -> dict[str, dict]:
    """name -> options pointing ``load_reward(name, **options)`` at the tiny weights on disk."""
    from diffalign.rewards.tiny import TINY_REWARDS, tiny_reward_options

    root = tmp_path_factory.mktemp("tiny-rewards")
    return {name: tiny_reward_options(name, cache_dir=root) for name in TINY_REWARDS}


@pytest.fixture(scope="session")
def tiny_rewards(tiny_options) -> dict:
    """name -> a built reward on the tiny weights (stateless, so shared by the whole session)."""
    from diffalign.rewards import load_reward

    return {name: load_reward(name, **options) for name, options in tiny_options.items()}


def make_images(batch: int = 4, height: int = 40, width: int = 48, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    """Deterministic images [batch, 3, height, width] in [0, 1] with some structure (not pure noise)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, 1, 1, generator=generator)
    noise = torch.rand(batch, 3, height, width, generator=generator)
    images = (0.6 * base + 0.4 * noise).clamp(0, 1)
    return images.requires_grad_(requires_grad)
