"""GRPO's pure maths: rewards -> advantages, and which sampler steps a micro-batch trains.

Advantages. Rewards of a round come as [N, G] (N groups of G images, one prompt per group):

* ``group_advantages``: ``(r - mean) / (std + eps)`` per group, or with the std of the whole
  round (``global_std``, Flow-GRPO's default). ``std`` is the population std (Flow-GRPO's numpy
  ``np.std``, ``eps = 1e-4``) or torch's unbiased one (Pref-GRPO, ``eps = 1e-8``).
* ``per_prompt_advantages``: Flow-GRPO's ``PerPromptStatTracker`` (``flow_grpo/stat_tracking.py``):
  the statistics are pooled by prompt *text*, so a prompt drawn twice in one round (two groups,
  on one or several processes) is normalised over all its images.
* ``aggregate_advantages``: several rewards (a ``composite`` reward's parts, or Pref-GRPO's win
  rate plus pointwise scores) -> one advantage: normalise the weighted sum of the rewards
  (``reward_sum``, Flow-GRPO's ``multi_score``), sum the weighted per-reward advantages
  (``advantage_sum``, Pref-GRPO without ``--apply_gdpo``), or sum them and re-normalise over the
  gathered round (``gdpo``, Pref-GRPO ``rewards/dispatcher.py compute_weighted_advantages`` with
  ``--apply_gdpo``).

Training steps. ``select_train_steps`` picks, per chain, the sampler steps it trains:
``first`` (Flow-GRPO ``train_sd3.py``: the first ``int(fraction * T)`` steps in order),
``random_per_sample`` (Pref-GRPO ``train_flux.py``: a random permutation per sample, the first
``int(fraction * T)`` of it) or ``random_per_batch`` (one random subset for the whole
micro-batch). ``ignore_last`` drops the last step first (Pref-GRPO's ``--ignore_last``); an SDE
window restricts the candidates to the window's steps (Flow-GRPO-Fast trains the window only).
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

StdKind = Literal["population", "unbiased"]
Aggregation = Literal["reward_sum", "advantage_sum", "gdpo"]
StepSelection = Literal["random_per_batch", "first", "random_per_sample"]


def _std(values: Tensor, unbiased: bool, dim=None, keepdim: bool = False) -> Tensor:
    if dim is None:
        return values.std(unbiased=unbiased) if values.numel() > 1 else torch.zeros((), dtype=values.dtype)
    if values.shape[dim] < 2:
        return torch.zeros_like(values.sum(dim=dim, keepdim=keepdim))
    return values.std(dim=dim, unbiased=unbiased, keepdim=keepdim)


def group_advantages(
    rewards: Tensor, global_std: bool = False, clip_max: float | None = None, eps: float = 1e-4,
    std: StdKind = "population",
) -> Tensor:
    """GRPO advantages from rewards [N, G] (N groups of G images of one prompt each):

        A = (r - mean over the group) / (std + eps)

    with the std of the group, or of all N * G rewards when ``global_std`` (Flow-GRPO); ``std``
    is the population or the unbiased estimate. ``clip_max`` clamps A to [-clip_max, clip_max].
    Returns [N, G]. A group whose rewards are all equal gets A = 0.
    """
    rewards = rewards.float()
    unbiased = std == "unbiased"
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    scale = _std(rewards, unbiased) if global_std else _std(rewards, unbiased, dim=1, keepdim=True)
    advantages = centred / (scale + eps)
    if clip_max is not None:
        advantages = advantages.clamp(-clip_max, clip_max)
    return advantages


def per_prompt_advantages(
    rewards: Tensor, prompts: Sequence[str], global_std: bool = False, clip_max: float | None = None,
    eps: float = 1e-4, std: StdKind = "population",
) -> Tensor:
    """Flow-GRPO's per-prompt stat tracking: rewards [N, G] whose group n has prompt ``prompts[n]``;
    every image is normalised by the mean (and std, unless ``global_std``) of *all* images of its
    prompt in the round. Returns [N, G]; with distinct prompts it equals :func:`group_advantages`."""
    rewards = rewards.float()
    if len(prompts) != rewards.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {rewards.shape[0]} groups")
    unbiased = std == "unbiased"
    advantages = torch.empty_like(rewards)
    round_std = _std(rewards, unbiased)
    for prompt in dict.fromkeys(prompts):
        rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        pooled = rewards[rows]
        scale = round_std if global_std else _std(pooled.flatten(), unbiased)
        advantages[rows] = (pooled - pooled.mean()) / (scale + eps)
    if clip_max is not None:
        advantages = advantages.clamp(-clip_max, clip_max)
    return advantages


def aggregate_advantages(
    rewards: Mapping[str, Tensor], weights: Mapping[str, float], mode: Aggregation,
    normalise, clip_max: float | None = None, eps: float = 1e-4, std: StdKind = "population",
) -> Tensor:
    """One advantage [N, G] from several rewards ``{name: [N, G]}`` with ``weights``.

    ``normalise(rewards [N, G]) -> advantages [N, G]`` is the per-reward normalisation (group or
    per-prompt, unclipped). ``reward_sum``: normalise(sum_k w_k r_k). ``advantage_sum``:
    sum_k w_k normalise(r_k). ``gdpo``: that sum, re-normalised over the whole (gathered) round,
    ``(A - mean) / (std + eps)``. The result is clipped to ``clip_max``.
    """
    names = list(rewards)
    if mode == "reward_sum":
        advantages = normalise(sum(weights[k] * rewards[k].float() for k in names))
    elif mode in ("advantage_sum", "gdpo"):
        advantages = sum(weights[k] * normalise(rewards[k].float()) for k in names)
        if mode == "gdpo":
            advantages = (advantages - advantages.mean()) / (_std(advantages, std == "unbiased") + eps)
    else:
        raise ValueError(f"advantage aggregation must be reward_sum, advantage_sum or gdpo, got {mode!r}")
    if clip_max is not None:
        advantages = advantages.clamp(-clip_max, clip_max)
    return advantages


def candidate_steps(num_steps: int, ignore_last: bool = False, window: tuple[int, int] | None = None) -> list[int]:
    """The sampler steps a run may train: all T, or the SDE window's, without the last step
    when ``ignore_last``."""
    steps = list(range(num_steps)) if window is None else list(range(window[0], window[1]))
    if ignore_last:
        steps = [k for k in steps if k != num_steps - 1]
    if not steps:
        raise ValueError("no sampler step left to train (ignore_last with a one-step schedule or window)")
    return steps


def train_step_count(num_candidates: int, fraction: float) -> int:
    """``int(fraction * candidates)`` steps (as both references count), at least 1."""
    return max(1, min(num_candidates, int(fraction * num_candidates + 1e-9)))


def select_train_steps(
    candidates: Sequence[int], fraction: float, selection: StepSelection, batch_size: int,
    generator: torch.Generator,
) -> Tensor:
    """The steps each of ``batch_size`` chains trains: [batch_size, K] long, K =
    :func:`train_step_count`. ``first``: the first K candidates; ``random_per_batch``: one sorted
    random subset for every chain (no draw when K is all of them); ``random_per_sample``: each
    chain the first K of its own random permutation."""
    candidates = torch.tensor(list(candidates), dtype=torch.long)
    count = train_step_count(len(candidates), fraction)
    if selection == "first" or (selection == "random_per_batch" and count == len(candidates)):
        return candidates[:count].expand(batch_size, count).clone()
    if selection == "random_per_batch":
        chosen = torch.randperm(len(candidates), generator=generator)[:count].sort().values
        return candidates[chosen].expand(batch_size, count).clone()
    if selection == "random_per_sample":
        rows = [torch.randperm(len(candidates), generator=generator)[:count] for _ in range(batch_size)]
        return candidates[torch.stack(rows)]
    raise ValueError(f"timestep selection must be first, random_per_batch or random_per_sample, got {selection!r}")


def place_sde_window(
    num_steps: int, size: int, placement: Literal["random", "sliding"], window_range: tuple[int, int] | None,
    round_index: int, generator: torch.Generator,
) -> tuple[int, int] | None:
    """Where a round's SDE window of ``size`` steps lies, (start, end), inside ``window_range``
    (default: every step). ``random``: a uniform start (Flow-GRPO-Fast: ``randint(lo, hi - size
    + 1)``); ``sliding``: the start moves one step per round from the range's first step and wraps
    (MixGRPO's sliding window). ``size`` 0: no window (None)."""
    if size == 0:
        return None
    lo, hi = window_range if window_range is not None else (0, num_steps)
    starts = hi - lo - size + 1
    if not (0 <= lo < hi <= num_steps) or starts < 1:
        raise ValueError(f"an SDE window of {size} steps does not fit in steps [{lo}, {hi}) of {num_steps}")
    if placement == "random":
        start = lo + int(torch.randint(starts, (1,), generator=generator))
    elif placement == "sliding":
        start = lo + round_index % starts
    else:
        raise ValueError(f"SDE window placement must be random or sliding, got {placement!r}")
    return start, start + size
