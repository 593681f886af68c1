"""The check every method test ends with: the reward of images *sampled* from the trained LoRA
against the base model (the same policy with the adapter off), fixed prompts and seeds."""

from __future__ import annotations

import contextlib

import torch

PROMPTS = ["a red cube", "a cat", "a tree", "a bowl of fruit"]


@torch.no_grad()
def sampled_images(policy, lora_on: bool, guidance: float = 1.0, steps: int = 4, seed: int = 0) -> torch.Tensor:
    """Deterministic samples [4, 3, H, W] in [0, 1] of PROMPTS, with the LoRA on or off."""
    from diffalign.training import sample_images

    with contextlib.nullcontext() if lora_on else policy.reference():
        return sample_images(policy, PROMPTS, seed, steps, guidance).float()


def sampled_reward(policy, reward_name: str = "brightness", **kwargs) -> tuple[float, float]:
    """(mean reward of base samples, mean reward of LoRA samples), same noise."""
    from diffalign.rewards import load_reward

    reward = load_reward(reward_name)
    base = reward(sampled_images(policy, False, **kwargs), PROMPTS).mean().item()
    tuned = reward(sampled_images(policy, True, **kwargs), PROMPTS).mean().item()
    return base, tuned
