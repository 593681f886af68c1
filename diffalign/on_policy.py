"""The on-policy consistency check of the online RL methods (GRPO, Pref-GRPO, D3PO).

Right after sampling, before any update, re-scoring a recorded transition under the current
weights must give back the log-probability recorded while sampling: the importance ratio
``exp(logp_recomputed - logp_sampled)`` is 1. When it is not, training silently runs off-policy
from its first step (users of Flow-GRPO and DanceGRPO report ratios of 0.7-0.8 and find out only
by printing them). The usual causes: the rollout and the training pass run in different dtypes,
they batch the chains differently (batch-size-dependent kernels round differently), or torch
picks a different attention kernel for the two shapes.

:class:`OnPolicyCheck` returns the ratio's statistics for every batch it sees (trainers average
them over a step's passes and log them every step) and compares every on-policy batch (the passes
of the first update after sampling) with a tolerance for the run's dtype; outside it, it warns
once, naming the likely causes.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

# max |ratio - 1| allowed at the first update, by the dtype the denoiser runs in. fp32: Flow-GRPO's
# clip range (1e-4); a ratio further off is clipped from the first update on. Half precision
# rounds at ~4e-3 (bf16) / ~5e-4 (fp16) per operation; the reported failures are 0.2-0.3 off.
ON_POLICY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def ratio_statistics(log_prob: Tensor, sampled_log_prob: Tensor) -> dict[str, Tensor]:
    """Detached 0-d statistics of ``exp(log_prob - sampled_log_prob)`` over a batch [B]:
    ratio_mean, ratio_min, ratio_max and ratio_dev = max |ratio - 1|."""
    ratio = torch.exp(log_prob.detach().float() - sampled_log_prob.detach().float().to(log_prob.device))
    return {"ratio_mean": ratio.mean(), "ratio_min": ratio.min(), "ratio_max": ratio.max(),
            "ratio_dev": (ratio - 1).abs().max()}


class OnPolicyCheck:
    """Ratio statistics every call; on-policy calls are checked against the tolerance.

    dtype: the dtype the denoiser computes in (the run's weight dtype, or the autocast dtype).
    sample_batch / train_batch: chains per sampler call and per training pass (a mismatch is
    named first among the causes); sample_dtype / train_dtype likewise, when they differ.
    """

    def __init__(self, dtype: torch.dtype, *, sample_batch: int | None = None, train_batch: int | None = None,
                 sample_dtype: torch.dtype | None = None, train_dtype: torch.dtype | None = None,
                 method: str = "") -> None:
        self.tolerance = ON_POLICY_TOLERANCE.get(dtype, 5e-2)
        self.dtype = dtype
        self.sample_batch, self.train_batch = sample_batch, train_batch
        self.sample_dtype, self.train_dtype = sample_dtype, train_dtype
        self.method = method
        self.passed: bool | None = None

    def likely_causes(self) -> list[str]:
        """The three causes, those this run's layout points at first."""
        dtype_differs = None not in (self.sample_dtype, self.train_dtype) and self.sample_dtype != self.train_dtype
        batch_differs = None not in (self.sample_batch, self.train_batch) and self.sample_batch != self.train_batch
        dtype = (f"a dtype mismatch between rollout ({self.sample_dtype}) and training ({self.train_dtype})"
                 if dtype_differs else "a dtype mismatch between rollout and training (autocast or a weight cast)")
        batch = (f"a different batch size ({self.sample_batch} chains per sampler call, {self.train_batch} per "
                 "training pass; batch-size-dependent kernels round differently)"
                 if batch_differs else "a different batch size between sampling and training")
        kernel = "an attention kernel (torch picks one per shape and dtype; pin it with train.sdpa_backends)"
        causes = [(dtype, dtype_differs), (batch, batch_differs), (kernel, False)]
        return [c for c, hit in causes if hit] + [c for c, hit in causes if not hit]

    def __call__(self, log_prob: Tensor, sampled_log_prob: Tensor, on_policy: bool = True) -> dict[str, Tensor]:
        """Statistics of this batch's ratio; when ``on_policy`` (a pass of the first update since
        the batch was sampled), check it, and warn the first time one is off. ``passed``: None
        before any check, then whether every checked batch was within the tolerance."""
        stats = ratio_statistics(log_prob, sampled_log_prob)
        if on_policy:
            dev = float(stats["ratio_dev"])
            ok = dev <= self.tolerance
            first_failure = not ok and self.passed is not False
            self.passed = ok if self.passed is None else (self.passed and ok)
            if first_failure:
                warnings.warn(
                    f"{self.method + ': ' if self.method else ''}on-policy check failed: at the first update the "
                    f"importance ratio exp(logp_recomputed - logp_sampled) is {float(stats['ratio_min']):.4f}.."
                    f"{float(stats['ratio_max']):.4f} (max |ratio - 1| = {dev:.3g} > {self.tolerance:g} allowed in "
                    f"{str(self.dtype).removeprefix('torch.')}); training starts off-policy. Likely causes: "
                    + "; ".join(self.likely_causes()),
                    RuntimeWarning, stacklevel=2,
                )
        return stats
