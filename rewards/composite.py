"""``composite``: a weighted sum of other rewards, with optional per-reward standardisation.

    reward = sum_k  w_k * s_k(r_k(images, prompts))

where ``s_k`` is the identity (``standardize: none``), a z-score within the call's batch
(``"batch"``, as GRPO-style trainers normalise each reward in a group), or a z-score with running
statistics accumulated over every call so far (``"running"``; save and restore them with
``statistics()`` / ``load_statistics()`` when checkpointing).

YAML::

    reward: {composite: {pickscore: 1.0, aesthetic: 0.1}}
    reward: {composite: {weights: {pickscore: 1.0, "clip:model=ViT-B-32": 0.5}, standardize: batch}}
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from diffalign.errors import UserError

from .base import Reward
from .registry import load_reward, options_taken, register_reward

STANDARDIZE_MODES = ("none", "batch", "running")


class CompositeReward(Reward):
    """Weighted sum of sub-rewards. Differentiable iff every part is.

    Args:
        parts: name -> built sub-reward (the key is the spec string, used in ``statistics()``).
        weights: name -> weight.
        standardize: ``"none"``, ``"batch"`` or ``"running"``.
        eps: floor added to the standard deviation.
    """

    def __init__(self, parts: Mapping[str, Reward], weights: Mapping[str, float], standardize: str = "none",
                 eps: float = 1e-6, bt_scale: float = 1.0) -> None:
        # weightless: the parts move images to their own devices; the sum lands on the images' device.
        super().__init__("composite", differentiable=all(p.differentiable for p in parts.values()),
                         batch_size=None, bt_scale=bt_scale, weightless=True)
        self.parts = torch.nn.ModuleDict({str(i): part for i, part in enumerate(parts.values())})
        self.part_names = list(parts)
        self.weights = [float(weights[name]) for name in self.part_names]
        self.standardize = standardize
        self.eps = eps
        # Running statistics per part (Chan et al. parallel variance): count, mean, sum of squared deviations.
        self._stats = {name: [0, 0.0, 0.0] for name in self.part_names}

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = None
        for name, part, weight in zip(self.part_names, self.parts.values(), self.weights):
            scores = part(images, prompts, grad=torch.is_grad_enabled()).to(images.device)
            scores = self._standardized(name, scores)
            total = weight * scores if total is None else total + weight * scores
        return total

    def _standardized(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        if self.standardize == "none":
            return scores
        if self.standardize == "batch":
            if scores.numel() < 2:
                return torch.zeros_like(scores)
            return (scores - scores.mean()) / (scores.std() + self.eps)
        self._update_running(name, scores.detach().double())
        count, mean, m2 = self._stats[name]
        std = (m2 / (count - 1)) ** 0.5 if count > 1 else 1.0
        return (scores - mean) / (std + self.eps)

    def _update_running(self, name: str, scores: torch.Tensor) -> None:
        count, mean, m2 = self._stats[name]
        n = scores.numel()
        batch_mean = scores.mean().item()
        batch_m2 = ((scores - batch_mean) ** 2).sum().item()
        total = count + n
        delta = batch_mean - mean
        self._stats[name] = [total, mean + delta * n / total, m2 + batch_m2 + delta**2 * count * n / total]

    def statistics(self) -> dict[str, dict[str, float]]:
        """Running statistics per part: ``{name: {"count", "mean", "m2"}}`` (JSON-serialisable)."""
        return {name: {"count": c, "mean": m, "m2": s} for name, (c, m, s) in self._stats.items()}

    def load_statistics(self, stats: Mapping[str, Mapping[str, float]]) -> None:
        """Restore what ``statistics()`` returned (e.g. from a checkpoint)."""
        for name, values in stats.items():
            if name not in self._stats:
                raise UserError(f"reward 'composite': saved statistics name '{name}', not one of {self.part_names}")
            self._stats[name] = [int(values["count"]), float(values["mean"]), float(values["m2"])]


@register_reward("composite", differentiable=None, rest_into="weights", weights="those of its parts")
def build_composite(weights: Mapping[str, float] | None = None, standardize: str | bool | None = "none",
                    eps: float = 1e-6, bt_scale: float = 1.0, device: str | None = None,
                    dtype: str | None = None, batch_size: int | None = None) -> Reward:
    """Weighted sum of rewards: ``weights`` maps reward specs to numbers.

    ``device``, ``dtype`` and ``batch_size`` are passed on to every part that takes them (so each part
    with weights is loaded straight onto ``device``), overriding the part's own.
    """
    if not weights:
        raise UserError("reward 'composite' needs weights, e.g. {composite: {pickscore: 1.0, aesthetic: 0.1}}")
    mode = {True: "batch", False: "none", None: "none"}.get(standardize, standardize)  # type: ignore[arg-type]
    if mode not in STANDARDIZE_MODES:
        raise UserError(f"reward 'composite': standardize={standardize!r}; use one of {', '.join(STANDARDIZE_MODES)}")
    shared: dict[str, Any] = {"device": device, "dtype": dtype, "batch_size": batch_size}
    parts: dict[str, Reward] = {}
    for spec, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UserError(f"reward 'composite': weight of '{spec}' must be a number, got {weight!r}")
        parts[spec] = load_reward(spec, **options_taken(spec, shared))
    return CompositeReward(parts, weights, mode, eps=eps, bt_scale=bt_scale)
