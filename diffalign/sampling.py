"""On-policy sampling pieces that the sampling trainers (D3PO, GRPO / Pref-GRPO) and
``diffalign sample`` (D3PO's human-feedback pairs) share, so that no core module imports a
trainer: the sampler defaults, the prompt conditioning for sampling, the pair sampler, which
sampler steps to train, and preferences from reward scores (one reward, or Pareto dominance
over several)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffalign.errors import UserError
from diffalign.pipelines.base import Conditioning, DiffusionPolicy, Trajectory
from diffalign.training import DEFAULT_GUIDANCE

# Sampler noise when ``noise_level`` is null: DDIM eta = 1 (the DDPM step D3PO and DDPO use);
# Flow-GRPO's a = 0.7 for the flow SDE.
DEFAULT_NOISE_LEVEL = {"sd": 1.0, "sdxl": 1.0, "flux": 0.7, "sd3": 0.7}


def check_reward_spec(spec: Any, key: str) -> Any:
    """Config-time check that a reward spec names a registered reward with valid options."""
    if spec is None:
        return None
    from diffalign.rewards import parse_reward_spec

    try:
        parse_reward_spec(spec)
    except UserError as err:
        raise UserError(f"config error: {key}: {err}") from None
    return spec


def guidance_or_default(guidance_scale: float | None, family: str) -> float:
    """``guidance_scale``, or the family's default CFG scale when it is None."""
    return DEFAULT_GUIDANCE[family] if guidance_scale is None else guidance_scale


def noise_level_or_default(noise_level: float | None, family: str) -> float:
    """``noise_level``, or the family's default (DDIM eta 1; flow SDE a = 0.7) when it is None."""
    return DEFAULT_NOISE_LEVEL[family] if noise_level is None else noise_level


def sampling_conditioning(
    policy: DiffusionPolicy, prompts: list[str], guidance_scale: float, negative_prompt: str | None,
    height: int | None = None, width: int | None = None,
) -> Conditioning:
    """Encode ``prompts`` for sampling: with an unconditional branch (the negative prompt, or
    "") when classifier-free guidance is on (``guidance_scale != 1``; FLUX: true CFG)."""
    height = height or policy.default_resolution()
    width = width or policy.default_resolution()
    if guidance_scale == 1.0:
        return policy.encode_prompts(prompts, height=height, width=width)
    negatives = [negative_prompt] * len(prompts) if negative_prompt is not None else None
    return policy.encode_prompts(prompts, negatives, with_uncond=True, height=height, width=width)


@torch.no_grad()
def sample_pairs(
    policy: DiffusionPolicy, prompts: list[str], generator: torch.Generator, num_steps: int,
    guidance_scale: float, noise_level: float, negative_prompt: str | None = None,
) -> Trajectory:
    """Two chains per prompt from one starting noise (D3PO): a trajectory of 2B chains ordered
    (p0 a, p0 b, p1 a, p1 b, ...), with decoded images."""
    size = policy.default_resolution()
    cond = sampling_conditioning(policy, prompts, guidance_scale, negative_prompt).repeat_interleave(2)
    latents = policy.initial_noise(2 * len(prompts), size, size, generator, group_size=2)
    return policy.sample(cond, num_steps, guidance_scale=guidance_scale, noise_level=noise_level,
                         generator=generator, latents=latents)


def train_step_indices(num_steps: int, fraction: float, generator: torch.Generator) -> list[int]:
    """The sampler steps to train on: all of them for fraction 1, else a random subset of
    ``max(1, int(fraction * num_steps))`` steps (sorted; DDPO's count), drawn with ``generator``."""
    count = max(1, min(num_steps, int(fraction * num_steps + 1e-9)))
    if count == num_steps:
        return list(range(num_steps))
    return sorted(torch.randperm(num_steps, generator=generator)[:count].tolist())


def preference_from_scores(scores: Tensor, negative: bool = False) -> tuple[Tensor, Tensor]:
    """Preferences of pairs from reward scores: ``[B, 2]`` (one reward) or ``[B, 2, K]`` (K
    rewards per image).

    One reward: the higher score wins; equal scores are a tie. K rewards: Pareto dominance, as
    the official D3PO ``compare()`` (yk7333/d3po, scripts/train_with_rm.py): image j wins when
    it scores at least as high on every reward and higher on one; when neither dominates (or
    all are equal) the pair is skipped. (K = 1 is the same rule.)

    Returns (winner [B] long in {0, 1}, valid [B] bool). With ``negative`` (Diffusion-NPO) the
    dominated image wins.
    """
    if scores.ndim == 2:
        scores = scores[..., None]
    if scores.ndim != 3 or scores.shape[1] != 2:
        raise ValueError(f"scores must be [B, 2] or [B, 2, K], got {tuple(scores.shape)}")
    a, b = scores[:, 0], scores[:, 1]
    b_dominates = (b >= a).all(dim=1) & (b > a).any(dim=1)
    a_dominates = (a >= b).all(dim=1) & (a > b).any(dim=1)
    winner = b_dominates.long()
    valid = a_dominates | b_dominates
    if negative:
        winner = 1 - winner
    return winner, valid
