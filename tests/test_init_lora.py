"""init_lora (continue training an existing LoRA) and reference: base | init, through the one
shared add-LoRA path every trainer calls (``diffalign.training.load_trainable_policy``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from diffalign import lora
from diffalign.config import load_config
from diffalign.errors import UserError


def dpo_config(out: Path, **overrides):
    data = {
        "method": "diffusion_dpo", "model": "tiny-sd", "output_dir": str(out), "seed": 0,
        "lora": {"rank": 4, "alpha": 8},
        "train": {"max_steps": 2, "learning_rate": 1e-3, "batch_size": 2, "checkpoint_every": 1},
        "dpo": {"beta": 500.0},
        "data": {"source": "builtin:brightness", "max_samples": 12, "eval_pairs": 4, "num_workers": 0},
        "logging": {"sample_every": 0},
    }
    return load_config(data, [f"{k}={v}" for k, v in overrides.items()])


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / lora.LORA_WEIGHT_NAME))


def first_eval(out: Path) -> dict:
    return next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step": 0' in line)


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory) -> Path:
    """A LoRA X trained for 2 DPO steps from zero (its lora_B is no longer zero)."""
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    final = DiffusionDPOTrainer(dpo_config(tmp_path_factory.mktemp("x"))).train()
    assert any(v.abs().sum() > 0 for k, v in tensors(final).items() if "lora_B" in k or "lora.up" in k)
    return final


def test_init_lora_starts_from_the_file_and_the_reference_stays_the_base(tmp_path, trained_lora):
    """Continuing X: before the first update the trainable adapter holds X's weights exactly, and
    with the default ``reference: base`` the held-out DPO loss at step 0 is not log 2 (policy
    base + X differs from the reference base); with ``reference: init`` the reference is base + X
    (frozen), so at step 0 policy == reference and the DPO loss is exactly log 2. Training then
    moves only the trainable copy."""
    from diffalign.pipelines.loading import load_policy
    from diffalign.training import load_trainable_policy
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    cfg = dpo_config(tmp_path / "a", init_lora=str(trained_lora), reference="init")
    policy = load_policy(cfg.model)
    params = lora.add_trainable_lora(policy.denoiser, policy.family, cfg.lora, cfg.init_lora, cfg.reference)
    fresh = load_policy(cfg.model)
    expected = lora.load_lora(fresh.denoiser, trained_lora)
    state = lora.lora_state_dict(policy.denoiser)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for n, p in policy.denoiser.named_parameters() if f".{lora.INIT_ADAPTER}." in n)
    del policy, fresh, load_trainable_policy

    on_base = DiffusionDPOTrainer(dpo_config(tmp_path / "base", init_lora=str(trained_lora))).train()
    on_init = DiffusionDPOTrainer(cfg).train()
    assert first_eval(tmp_path / "base")["eval/dpo_loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert first_eval(tmp_path / "a")["eval/dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    x, a = tensors(trained_lora), tensors(on_init)
    assert x.keys() == a.keys() and any(not torch.equal(x[k], a[k]) for k in x)
    assert tensors(on_base).keys() == x.keys()


def test_resume_with_init_lora_and_init_reference_is_bitwise(tmp_path, trained_lora):
    """2 steps straight == 1 step + resume + 1 step, continuing X with reference: init."""
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    common = {"init_lora": str(trained_lora), "reference": "init", "data.eval_pairs": 0}
    straight = DiffusionDPOTrainer(dpo_config(tmp_path / "s", **common)).train()
    DiffusionDPOTrainer(dpo_config(tmp_path / "r", **common, **{"train.max_steps": 1})).train()
    resumed = DiffusionDPOTrainer(dpo_config(tmp_path / "r", **common, resume="latest")).train()
    a, b = tensors(straight), tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_lora_mistakes_are_one_line_errors(tmp_path, trained_lora):
    from diffalign.pipelines.loading import load_policy

    with pytest.raises(UserError, match=r"reference: 'init' needs init_lora"):
        dpo_config(tmp_path, reference="init")
    cfg = dpo_config(tmp_path, init_lora=str(trained_lora), **{"lora.rank": 16, "lora.alpha": 16})
    sd = load_policy("tiny-sd")
    with pytest.raises(UserError, match=r"rank-4 LoRA with alpha 8, but lora.rank=16 and lora.alpha=16; set lora.rank=4 lora.alpha=8"):
        lora.add_trainable_lora(sd.denoiser, "sd", cfg.lora, cfg.init_lora)
    flux = load_policy("tiny-flux")
    with pytest.raises(UserError, match=r"is a LoRA for a unet \(another model family\)"):
        lora.add_trainable_lora(flux.denoiser, "flux", cfg.lora, cfg.init_lora)
    with pytest.raises(UserError, match=r"no LoRA at"):
        lora.add_trainable_lora(sd.denoiser, "sd", cfg.lora, str(tmp_path / "missing"))


def test_overwrite_never_deletes_the_init_lora(tmp_path, trained_lora):
    """init_lora inside the output_dir that --overwrite would wipe: refused, the file stays."""
    import shutil

    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    out = tmp_path / "run"
    shutil.copytree(trained_lora, out / "final")
    with pytest.raises(UserError, match=r"--overwrite would delete init_lora="):
        DiffusionDPOTrainer(dpo_config(out, init_lora=str(out / "final")), overwrite=True).train()
    assert (out / "final" / lora.LORA_WEIGHT_NAME).is_file()
