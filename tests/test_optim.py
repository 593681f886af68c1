"""The optimizer helpers of diffalign.optim: gradient clipping, the warmup schedule, and the
GPU-only options' one-line errors (the Run-level tests are in test_run.py)."""

import pytest
import torch

from diffalign.config import TrainSettings
from diffalign.errors import UserError
from diffalign.optim import build_lr_scheduler, build_optimizer, clip_gradients, maybe_enable_xformers


def test_clip_gradients_returns_norm_and_clips():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([p], 1.0) == pytest.approx(5.0)
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8]), atol=1e-6)
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients({"p": p}, None) == pytest.approx(5.0) and torch.equal(p.grad, torch.tensor([3.0, 4.0]))


def test_scheduler_warmup_and_gpu_only_options():
    train = TrainSettings(learning_rate=1.0, warmup_steps=4, max_steps=10)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], train)
    sched = build_lr_scheduler(opt, train)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0]
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"train.use_8bit_adam needs bitsandbytes on a CUDA machine"):
            build_optimizer([torch.nn.Parameter(torch.zeros(1))], TrainSettings(use_8bit_adam=True))
        with pytest.raises(UserError, match=r"train.enable_xformers needs CUDA and xformers"):
            maybe_enable_xformers(torch.nn.Linear(1, 1), TrainSettings(enable_xformers=True))
    assert maybe_enable_xformers(torch.nn.Linear(1, 1), TrainSettings()) is False
