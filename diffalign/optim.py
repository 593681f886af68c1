"""The optimizer side of a run: AdamW (or 8-bit AdamW), the learning-rate schedule, gradient
averaging over processes, clipping, and attention-kernel switches.

A trainer builds them with :func:`build_optimizer` and :func:`build_lr_scheduler`; one optimizer
step goes through :func:`diffalign.training.optimizer_step`, which calls :func:`sync_gradients`
and :func:`clip_gradients`. On resume, :func:`apply_train_settings` gives the restored optimizer
the config's hyperparameters.
"""

from __future__ import annotations

import importlib.util

import torch
from accelerate import Accelerator

from diffalign.config import TrainSettings
from diffalign.errors import UserError

# train.* keys whose old value the restored optimizer/scheduler state would keep: re-applied.
OPTIMIZER_KEYS = ("learning_rate", "lr_scheduler", "warmup_steps", "max_steps",
                  "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon")


def apply_train_settings(optimizer, lr_scheduler, train: TrainSettings) -> None:
    """Give a restored optimizer and schedule the config's hyperparameters (a checkpoint holds the
    old ones): learning rate (through the schedule at its current step), betas, weight decay, eps."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["betas"] = (train.adam_beta1, train.adam_beta2)
        group["weight_decay"] = train.adam_weight_decay
        group["eps"] = train.adam_epsilon
        group["initial_lr"] = train.learning_rate
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if lr_scheduler is None or lambdas is None:
        for group in optimizer.param_groups:
            group["lr"] = train.learning_rate
        return
    lr_scheduler.base_lrs = [train.learning_rate for _ in optimizer.param_groups]
    lrs = [base * fn(lr_scheduler.last_epoch) for base, fn in zip(lr_scheduler.base_lrs, lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    lr_scheduler._last_lr = lrs


# --- optimisation helpers --------------------------------------------------------------------

# train.sdpa_backends names -> torch's switches for scaled_dot_product_attention's kernels.
SDPA_SWITCHES = {
    "flash": (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    "efficient": (torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
    "cudnn": (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
    "math": (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
}


def set_sdpa_switches(switches: dict[str, bool]) -> dict[str, bool]:
    """Turn scaled_dot_product_attention's kernels (names of ``SDPA_SWITCHES``) on or off for
    the process; returns those switches as they were, to put them back with."""
    before = {name: SDPA_SWITCHES[name][0]() for name in switches}
    for name, on in switches.items():
        SDPA_SWITCHES[name][1](on)
    return before


def build_optimizer(params, train: TrainSettings) -> torch.optim.Optimizer:
    """AdamW over ``params`` (a list or a name -> Parameter dict); bitsandbytes AdamW8bit if asked."""
    params = list(params.values()) if isinstance(params, dict) else list(params)
    kwargs = dict(
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )
    if train.use_8bit_adam:
        if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
            raise UserError(
                "train.use_8bit_adam needs bitsandbytes on a CUDA machine: pip install 'diffalign[bnb]' "
                "or set train.use_8bit_adam=false"
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainSettings):
    """``train.lr_scheduler`` with ``warmup_steps`` over ``max_steps``; step it once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=train.max_steps,
    )


def sync_gradients(params, accelerator: Accelerator) -> None:
    """Average the gradients of ``params`` over all processes as one flat buffer (no-op for one).

    Call on every process after the last backward of an optimizer step. A parameter without a
    gradient counts as zeros, so every process takes part with the same buffer layout.
    """
    if accelerator.num_processes <= 1:
        return
    params = list(params.values()) if isinstance(params, dict) else list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= accelerator.num_processes
    offset = 0
    for param in params:
        n = param.numel()
        param.grad = flat[offset : offset + n].view_as(param).to(param.dtype).clone()
        offset += n


def clip_gradients(params, max_norm: float | None) -> float:
    """Clip the total gradient norm of ``params`` to ``max_norm`` (None: only measure); the norm before."""
    params = list(params.values()) if isinstance(params, dict) else list(params)
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return float(norm)


def maybe_enable_xformers(denoiser_or_pipe, train: TrainSettings) -> bool:
    """Turn on xformers attention when ``train.enable_xformers``; True if it did."""
    if not train.enable_xformers:
        return False
    if not torch.cuda.is_available() or importlib.util.find_spec("xformers") is None:
        raise UserError(
            "train.enable_xformers needs CUDA and xformers: pip install 'diffalign[xformers]' "
            "or set train.enable_xformers=false"
        )
    denoiser_or_pipe.enable_xformers_memory_efficient_attention()
    return True
