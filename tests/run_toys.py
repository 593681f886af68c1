"""The toy problem the run-machinery tests train: a Linear(4, 3) regression whose every RNG and
optimizer state a checkpoint holds changes the result (used by test_run, test_run_work_kept and
test_report)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from diffalign.config import BaseRunConfig, TrainSettings
from diffalign.optim import build_lr_scheduler, build_optimizer, clip_gradients, sync_gradients
from diffalign.run import Run, TrainingState

W_TRUE = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [2.0, 0.0, -1.0], [-1.0, 0.5, 0.0]])


class ToyRunConfig(BaseRunConfig):
    method: Literal["toy_run"] = "toy_run"


def toy_config(out: Path, **train) -> ToyRunConfig:
    settings = dict(max_steps=6, learning_rate=0.05, warmup_steps=3, checkpoint_every=3)
    settings.update(train)
    return ToyRunConfig(output_dir=str(out), train=settings)


class ToyProblem:
    """A Linear(4, 3) regressing y = x W* (+ noise) with AdamW, warmup and clipping.

    Data come from the named generator; with ``global_rng`` the noise also draws on the global
    torch, numpy and python RNGs, so every RNG state a checkpoint holds changes the result.
    """

    def __init__(self, train: TrainSettings, data_seed: int = 0, init_seed: int = 0, global_rng: bool = True):
        init = torch.Generator().manual_seed(init_seed)
        self.model = torch.nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=init))
        self.params = dict(self.model.named_parameters())
        self.optimizer = build_optimizer(self.params, train)
        self.scheduler = build_lr_scheduler(self.optimizer, train)
        self.global_rng = global_rng
        self.state = TrainingState(
            params=self.params,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            generators={"data": torch.Generator().manual_seed(data_seed)},
            data_state={"seen": 0},
            extra_tensors={"ema_loss": torch.zeros(())},
        )

    def loss(self, generator: torch.Generator) -> torch.Tensor:
        x = torch.randn(8, 4, generator=generator)
        y = x @ W_TRUE
        if self.global_rng:
            y = y + 0.1 * torch.randn(8, 3) * random.random() + float(np.random.rand())
        return ((self.model(x) - y) ** 2).mean()

    def train(self, run: Run, start: int, stop: int, extra: dict | None = None) -> None:
        for step in range(start + 1, stop + 1):
            loss = self.loss(self.state.generators["data"])
            loss.backward()
            sync_gradients(self.params, run.accelerator)
            grad_norm = clip_gradients(self.params, run.cfg.train.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.data_state["seen"] += 8
            self.state.extra_tensors["ema_loss"].mul_(0.9).add_(0.1 * loss.detach())
            run.log(step, {"loss": loss.item(), "grad_norm": grad_norm, **(extra or {})})
            run.maybe_checkpoint(step, self.state)

    def snapshot(self) -> dict[str, torch.Tensor]:
        out = {f"param.{k}": v.detach().clone() for k, v in self.params.items()}
        for i, s in enumerate(self.optimizer.state_dict()["state"].values()):
            out.update({f"opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in s.items()})
        out["ema_loss"] = self.state.extra_tensors["ema_loss"].clone()
        return out


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
