"""The reward-hacking guard: watch a held-out reward and sample diversity while training.

Every ``guard.every`` optimizer steps the guard samples the ``eval`` prompts with fixed seeds
(``eval.num_images_per_prompt`` seeds per prompt, deterministic sampler), scores them with
``eval.reward`` (which should differ from the training reward) and measures diversity: the mean
pairwise RMS pixel distance between the images of one prompt over seeds. Its verdict is

* ``hacking`` when the training reward (``guard.train_metric``, mean over the steps since the
  previous check) has risen above its value at the best held-out check while the held-out reward
  fell by more than ``guard.tolerance`` from its best, or when diversity fell below
  ``guard.min_diversity`` x its value at the start;
* ``ok`` otherwise.

After ``guard.patience`` hacking verdicts in a row, ``guard.action`` acts: ``warn`` prints,
``stop`` ends the run (final/ written as below), ``rollback`` puts back the LoRA of the best
held-out check and ends the run. With ``guard.keep_best`` (default) the final LoRA is the one of
the best held-out check, and the last weights go to ``last/``. Every check is a metrics.jsonl
record (``guard/verdict``, ``guard/reason``, ``guard/heldout_reward``, ``guard/diversity``, ...)
and a row of the report.

The guard is on whenever ``eval.reward`` is set (``guard.enabled: false`` turns it off). It hooks
into :func:`diffalign.training.end_step` and :func:`~diffalign.training.finish_run`, so every
trainer that ends its steps there has it without code of its own. A resumed run starts the guard
afresh from the resumed weights. ``HackingDetector`` is the decision alone, on plain numbers.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GuardSettings(BaseModel):
    """Reward-hacking guard: a held-out reward and diversity checked while training (needs eval.reward)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(None, description="null = on whenever eval.reward is set; false = off.")
    every: int | None = Field(
        None, gt=0, description="Check every this many optimizer steps (and at the last); null = max_steps // 10."
    )
    tolerance: float = Field(
        0.05, ge=0, description="Hacking when the held-out reward is more than this below its best (in reward "
        "units) while the training reward rose."
    )
    min_diversity: float = Field(
        0.5, ge=0, le=1, description="Hacking when diversity falls below this fraction of its value at the start; 0 = off."
    )
    patience: int = Field(1, ge=1, description="Hacking verdicts in a row before guard.action acts.")
    action: Literal["warn", "stop", "rollback"] = Field(
        "warn", description="warn: print; stop: end the run; rollback: restore the LoRA of the best held-out check, end the run."
    )
    keep_best: bool = Field(
        True, description="The final LoRA is the one of the best held-out check (the last weights go to last/)."
    )
    train_metric: str = Field(
        "reward", description="The logged training metric that should rise; a run without it uses -loss."
    )


# --- the decision, on plain numbers -------------------------------------------------------------


@dataclass
class Check:
    """One guard evaluation: the held-out reward, diversity (None: one seed per prompt) and the
    training metric averaged since the previous check (None at the start)."""

    step: int
    heldout: float
    diversity: float | None = None
    train: float | None = None


@dataclass
class Verdict:
    verdict: Literal["ok", "hacking"]
    reason: str
    best_step: int
    best_heldout: float
    act: bool  # the action fires now (hacking, patience reached)


class HackingDetector:
    """Feed it :class:`Check` s in step order; each gets a :class:`Verdict`. The first check is
    the start (its held-out reward is the first best and its diversity the reference)."""

    def __init__(self, tolerance: float = 0.05, min_diversity: float = 0.5, patience: int = 1) -> None:
        self.tolerance, self.min_diversity, self.patience = tolerance, min_diversity, patience
        self.best: Check | None = None
        self.start_diversity: float | None = None
        self.first_train: float | None = None
        self.in_a_row = 0

    def observe(self, check: Check) -> Verdict:
        if self.best is None:
            self.best, self.start_diversity = check, check.diversity
            return Verdict("ok", "start", check.step, check.heldout, False)
        if self.first_train is None:
            self.first_train = check.train
        if check.heldout > self.best.heldout:
            self.best = check
        # the training reward at the best check; the start has none, so the first one measured
        reference = self.best.train if self.best.train is not None else self.first_train
        fell = self.best.heldout - check.heldout
        rising = check.train is not None and reference is not None and check.train > reference
        reasons = []
        if fell > self.tolerance and rising:
            reasons.append(
                f"training reward rose to {check.train:.4g} (from {reference:.4g}) while the held-out reward fell "
                f"{fell:.4g} below its best {self.best.heldout:.4g} (step {self.best.step})"
            )
        start = self.start_diversity
        if start is not None and check.diversity is not None and check.diversity < self.min_diversity * start:
            reasons.append(f"diversity {check.diversity:.4g} fell below {self.min_diversity:g} x its start {start:.4g}")
        if reasons:
            self.in_a_row += 1
            return Verdict("hacking", "; ".join(reasons), self.best.step, self.best.heldout, self.in_a_row >= self.patience)
        self.in_a_row = 0
        if self.best is check:
            reason = "new best held-out reward"
        elif fell > self.tolerance:
            reason = f"held-out reward {fell:.4g} below its best, but the training reward did not rise"
        else:
            reason = "held-out reward within tolerance of its best"
        return Verdict("ok", reason, self.best.step, self.best.heldout, False)


def pairwise_diversity(images) -> float:
    """Mean pairwise RMS distance between samples of one prompt over seeds.

    images: [K seeds, P prompts, 3, H, W] in [0, 1]. For each prompt and each pair of seeds i < j,
    sqrt(mean((x_i - x_j)^2)); the mean over pairs and prompts. NaN for K < 2.
    """
    k = images.shape[0]
    if k < 2:
        return float("nan")
    flat = images.float().flatten(2)  # [K, P, D]
    distances = [((flat[i] - flat[j]) ** 2).mean(dim=1).sqrt() for i in range(k) for j in range(i + 1, k)]
    import torch

    return torch.stack(distances).mean().item()


def output_drift(policy, prompts: list[str], num_steps: int, seed: int = 1234) -> float:
    """Drift from the base: the mean squared difference of the denoiser outputs with and without
    the LoRA, on ``prompts`` with fixed noise (``seed``) at the first, middle and last timestep of
    a ``num_steps`` schedule, without guidance."""
    import torch

    size = policy.default_resolution()
    with torch.no_grad():
        cond = policy.encode_prompts(list(prompts), with_uncond=False)
        x = policy.initial_noise(len(prompts), size, size, torch.Generator().manual_seed(seed))
        timesteps, _ = policy.schedule(max(3, num_steps), size, size)
        total = 0.0
        for i in (0, len(timesteps) // 2, len(timesteps) - 1):
            tuned = policy.predict(x, timesteps[i], cond, guidance_scale=1.0)
            with policy.reference():
                base = policy.predict(x, timesteps[i], cond, guidance_scale=1.0)
            total += (tuned - base).float().pow(2).mean().item()
    return total / 3


# --- the guard of one run ---------------------------------------------------------------------


class GuardStopped(Exception):
    """The guard ended the run (``guard.action`` stop or rollback); ``final`` holds the final LoRA."""

    def __init__(self, message: str, step: int, final) -> None:
        super().__init__(message)
        self.step, self.final = step, final


def guard_is_on(cfg) -> bool:
    """True when the run has a guard: ``guard.enabled`` is not false and ``eval.reward`` is set."""
    evaluation = getattr(cfg, "eval", None)
    has_reward = getattr(evaluation, "reward", None) is not None
    return cfg.guard.enabled is not False and has_reward


class RewardHackingGuard:
    """The guard of one run (see the module docstring); made by :func:`guard_for`."""

    def __init__(self, run, cfg, policy, params, start_step: int) -> None:
        from diffalign.training import load_frozen_reward

        self.run, self.cfg, self.policy, self.params = run, cfg, policy, list(params)
        self.settings: GuardSettings = cfg.guard
        self.every = self.settings.every or max(1, cfg.train.max_steps // 10)
        self.reward = load_frozen_reward(cfg.eval.reward, run.device)  # the trainer's own object (cached)
        self.detector = HackingDetector(self.settings.tolerance, self.settings.min_diversity, self.settings.patience)
        self.train_values: list[float] = []
        self.best_weights = None
        self.best_step = start_step
        if cfg.eval.num_images_per_prompt < 2:
            run.print("guard: eval.num_images_per_prompt < 2, so diversity is not measured (set it to 2 or more)")
        trained = [getattr(getattr(cfg, name, None), "reward", None) for name in type(cfg).model_fields if name != "eval"]
        if cfg.eval.reward in trained:
            run.print(f"guard: eval.reward {cfg.eval.reward!r} is also the training reward; the guard cannot see it "
                      "being hacked. Set eval.reward to another reward (e.g. a verifiable one)")
        trained_prompts = {p for name in type(cfg).model_fields if name != "eval"
                           for p in _prompt_list(getattr(getattr(cfg, name, None), "prompts", None))}
        shared = [p for p in cfg.eval.prompts if p in trained_prompts]
        if shared:
            run.print(f"guard: {len(shared)} of the {len(cfg.eval.prompts)} eval.prompts are also training prompts "
                      f"(e.g. {shared[0]!r}); held-out prompts show hacking sooner")
        run.print(f"guard: held-out {self.reward.name} and diversity on {len(cfg.eval.prompts)} prompts x "
                  f"{cfg.eval.num_images_per_prompt} seeds every {self.every} steps; action {self.settings.action}, "
                  f"keep_best {self.settings.keep_best}")
        self.check(start_step, train=None)

    def measure(self) -> tuple[float, float]:
        """(mean held-out reward, diversity) of the eval prompts and seeds, with the current weights;
        also sets ``self.drift`` (:func:`output_drift` on the eval prompts)."""
        import torch

        from diffalign.training import sample_images

        e = self.cfg.eval
        per_seed, scores = [], []
        with torch.no_grad():
            for k in range(e.num_images_per_prompt):
                images = sample_images(self.policy, e.prompts, e.seed + k, e.num_steps, e.guidance_scale).float()
                scores.append(self.reward(images, list(e.prompts)).float().cpu())
                per_seed.append(images.cpu())
        self.drift = output_drift(self.policy, e.prompts, e.num_steps)
        return torch.cat(scores).mean().item(), pairwise_diversity(torch.stack(per_seed))

    def check(self, step: int, train: float | None) -> Verdict:
        """Measure, decide (the same on every process), log; snapshot the weights at a new best."""
        heldout, diversity = self.measure()
        check = Check(step, heldout, None if math.isnan(diversity) else diversity, train)
        verdict = self.detector.observe(check)
        if self.run.num_processes > 1:  # every process acts on the main process's verdict
            from accelerate.utils import broadcast_object_list

            verdict = broadcast_object_list([verdict])[0]
        if verdict.best_step == step:
            self.best_step = step
            self.best_weights = [p.detach().to("cpu", copy=True) for p in self.params]
        action = self.settings.action if verdict.act else "none"
        record = {"guard/verdict": verdict.verdict, "guard/reason": verdict.reason, "guard/heldout_reward": heldout,
                  "guard/best_heldout": verdict.best_heldout, "guard/best_step": verdict.best_step,
                  "guard/hacking": float(verdict.verdict == "hacking"), "guard/action": action}
        if check.diversity is not None:
            record["guard/diversity"] = check.diversity
        record["guard/drift"] = self.drift
        if train is not None:
            record["guard/train_reward"] = train
        self.run.log(step, record)
        if verdict.verdict == "hacking":
            self.run.print(f"guard: step {step}: reward hacking: {verdict.reason}")
        return verdict

    def after_step(self, step: int, metrics: dict) -> None:
        """Call after each step's update and checkpoint. Checks every ``every`` steps and at the
        last; on an acting stop/rollback verdict writes final/ and raises :class:`GuardStopped`."""
        name = self.settings.train_metric
        value = float(metrics[name]) if name in metrics else -float(metrics["loss"]) if "loss" in metrics else None
        if value is not None and math.isfinite(value):  # a skipped NaN step says nothing
            self.train_values.append(value)
        if step % self.every and step != self.cfg.train.max_steps:
            return
        train = sum(self.train_values) / len(self.train_values) if self.train_values else None
        self.train_values = []
        verdict = self.check(step, train)
        if not verdict.act or self.settings.action == "warn":
            return
        from diffalign.training import save_final_lora

        if self.settings.action == "rollback" or self.settings.keep_best:
            self.restore_best(step)
        save_final_lora(self.run, self.policy, self.cfg, negative_metadata(self.cfg))
        self.run.finish()  # after --overwrite, this moves the run folder into place: name final/ after it
        final = self.run.out_dir / "final"
        message = (f"stopped by the reward-hacking guard at step {step} (guard.action={self.settings.action}): "
                   f"{verdict.reason}; {final} holds the LoRA of step {self.final_step(step)}")
        self.run.accelerator.print(message)
        raise GuardStopped(message, step, final)

    def final_step(self, step: int) -> int:
        return self.best_step if self.settings.keep_best or self.settings.action == "rollback" else step

    def restore_best(self, step: int) -> None:
        """Put the best check's LoRA weights back (the current ones are saved to last/ first)."""
        import torch

        if self.best_weights is None or self.best_step == step:
            return
        from diffalign import lora

        if self.run.is_main:
            lora.save_lora(self.policy.pipe, self.policy.denoiser, self.run.out_dir / "last", self.cfg.lora,
                           self.policy.family, negative_metadata(self.cfg), method=self.cfg.method)
        with torch.no_grad():
            for param, best in zip(self.params, self.best_weights):
                param.copy_(best.to(param.device, param.dtype))
        self.run.print(f"guard: final LoRA = step {self.best_step} (best held-out reward); "
                       f"the weights of step {step} are in {self.run.out_dir / 'last'}")


def _prompt_list(prompts) -> list[str]:
    """A section's ``prompts`` when it is a list (a file path or a missing value: none)."""
    return list(prompts) if isinstance(prompts, (list, tuple)) else []


def negative_metadata(cfg) -> dict[str, str] | None:
    """The LoRA metadata of a negative (NPO) run: any config section with ``negative: true``."""
    negative = any(getattr(getattr(cfg, name, None), "negative", False) is True for name in type(cfg).model_fields)
    return {"negative": "true"} if negative else None


_GUARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def guard_for(run, cfg, policy, params, step: int) -> RewardHackingGuard | None:
    """The run's guard, made (and its start measured, before this step's update) on the first
    call; None when the guard is off."""
    if not guard_is_on(cfg):
        return None
    if run not in _GUARDS:
        _GUARDS[run] = RewardHackingGuard(run, cfg, policy, params, step - 1)
    return _GUARDS[run]


def finish_guard(run, step: int) -> None:
    """At the end of a run: with ``guard.keep_best``, the best check's weights go into final/."""
    guard = _GUARDS.get(run)
    if guard is not None and guard.settings.keep_best:
        guard.restore_best(step)
