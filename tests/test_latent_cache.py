"""data.cache: cached VAE posteriors and prompt embeddings give the losses of training on images,
the disk cache is keyed and reused, and the settings that cannot be cached are config errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from diffalign.config import load_config
from diffalign.errors import UserError

# This file is also a two-process worker: `accelerate launch ... tests/test_latent_cache.py OUT`.


def _dpo(tmp_path, model, name, **overrides):
    data = {
        "method": "diffusion_dpo", "model": model, "output_dir": str(tmp_path / name), "seed": 0,
        "lora": {"rank": 4},
        "train": {"max_steps": 3, "learning_rate": 1e-3, "batch_size": 2, "checkpoint_every": 0,
                  "lr_scheduler": "constant"},
        "data": {"source": "builtin:brightness", "max_samples": 8, "random_flip": False, "num_workers": 0},
        "dpo": {"beta": 500.0, "empty_prompt_fraction": 0.25},
        "logging": {"sample_every": 0},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        data.setdefault(section, {})[field] = value
    return load_config(data)


def _train(cfg):
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    trainer = DiffusionDPOTrainer(cfg, overwrite=True)
    trainer.train()
    out = Path(cfg.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lora_file = out / "final" / "pytorch_lora_weights.safetensors"
    return [r["loss"] for r in records if "loss" in r], safetensors.torch.load_file(str(lora_file)), trainer


@pytest.mark.parametrize("model,flip", [("tiny-sdxl", False), ("tiny-sdxl", True), ("tiny-flux", False)])
def test_a_cached_run_gives_the_losses_of_an_uncached_one(tmp_path, model, flip):
    """SDXL (time ids from the cached sizes and crops) and FLUX (shared text ids, a shifted VAE);
    with random_flip both mirrored posteriors are cached and the same per-(epoch, pair) flip is drawn."""
    plain, plain_lora, _ = _train(_dpo(tmp_path, model, "plain", **{"data.random_flip": flip}))
    cached, cached_lora, trainer = _train(_dpo(tmp_path, model, "cached", **{"data.random_flip": flip,
                                                                              "data.cache": "memory"}))
    assert trainer.cache is not None and len(trainer.cache) == 8
    assert len(plain) == len(cached) == 3
    # the first step is the same to the bit but for text-encoder round-off between batch layouts;
    # beta (500) amplifies that round-off in later steps to a few 1e-5
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=2e-4, atol=1e-5)
    # Adam normalises each element's step, so an element whose gradient is ~0 may step either way
    # on round-off: compare the LoRA as a whole
    diff = sum((cached_lora[k] - plain_lora[k]).abs().sum() for k in plain_lora)
    size = sum(plain_lora[k].abs().sum() for k in plain_lora)
    assert diff / size < 1e-3


def test_disk_cache_is_written_once_reused_and_keyed(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    first, _, _ = _train(_dpo(tmp_path, "tiny-sd", "a", **{"data.cache": "disk", "data.cache_dir": str(cache_dir)}))
    folders = [p for p in cache_dir.iterdir()]
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    assert sorted(p.name for p in folders[0].glob("*.safetensors")) == ["pairs-00000.safetensors", "prompts.safetensors"]
    assert "data.cache=disk: wrote 8 encoded pairs" in capsys.readouterr().out
    again, _, _ = _train(_dpo(tmp_path, "tiny-sd", "b", **{"data.cache": "disk", "data.cache_dir": str(cache_dir)}))
    assert "data.cache=disk: reusing" in capsys.readouterr().out
    assert again == first
    assert [p for p in cache_dir.iterdir()] == folders
    uncached, _, _ = _train(_dpo(tmp_path, "tiny-sd", "c"))
    torch.testing.assert_close(torch.tensor(first), torch.tensor(uncached), rtol=2e-4, atol=1e-5)
    # another augmentation setting is another key: a second folder, the first untouched
    _train(_dpo(tmp_path, "tiny-sd", "d", **{"data.cache": "disk", "data.cache_dir": str(cache_dir),
                                             "data.random_flip": True}))
    assert len(list(cache_dir.iterdir())) == 2 and folders[0].is_dir()


def test_offload_frozen_trains_from_the_cache_and_still_samples(tmp_path):
    cfg = _dpo(tmp_path, "tiny-sd", "off", **{"data.cache": "memory", "train.offload_frozen": True,
                                              "logging.sample_every": 3, "data.eval_pairs": 2})
    losses, _, trainer = _train(cfg)
    assert len(losses) == 3 and all(map(lambda x: x == x, losses))
    assert (Path(cfg.output_dir) / "samples" / "step-000003.png").is_file()
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/pref_acc" in r for r in records)  # held-out pairs: encoded with the VAE brought back
    assert all(m.device.type == "cpu" for m in trainer.policy.frozen_components() for m in m.parameters())


@pytest.mark.parametrize("overrides,fragment", [
    ({"data.cache": "memory", "data.random_crop": True}, "data.cache needs data.random_crop: false"),
    ({"train.offload_frozen": True}, "train.offload_frozen needs data.cache: memory or disk"),
    ({"data.cache": "ram"}, "data.cache"),
])
def test_what_cannot_be_cached_is_a_config_error(tmp_path, overrides, fragment):
    with pytest.raises(UserError) as info:
        _dpo(tmp_path, "tiny-sd", "x", **overrides)
    assert fragment in str(info.value)


def test_the_key_follows_the_image_bytes(tmp_path):
    """Rewriting one image of a JSONL manifest changes the data fingerprint (so the cache key)."""
    from PIL import Image

    from diffalign.data import JsonlPairs
    from diffalign.latent_cache import data_fingerprint

    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a.png", "rejected": "b.png"}) + "\n")
    before = data_fingerprint(JsonlPairs(tmp_path / "pairs.jsonl"))
    assert data_fingerprint(JsonlPairs(tmp_path / "pairs.jsonl")) == before
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "b.png")
    assert data_fingerprint(JsonlPairs(tmp_path / "pairs.jsonl")) != before


@pytest.mark.parametrize("model,flip", [("tiny-sdxl", True), ("tiny-flux", False)])
def test_self_npo_on_cached_images_gives_the_losses_of_images(tmp_path, model, flip):
    """Self-NPO with data.images: the cached posteriors, captions and unconditional branch (SDXL's
    zeros, FLUX's empty prompt) give the uncached run's losses."""
    from PIL import Image

    from diffalign.trainers.npo import SelfNPOTrainer

    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)]):
        Image.new("RGB", (40 + 8 * i, 32), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a plain colour field {i}")

    def run(name, cache):
        cfg = load_config({
            "method": "self_npo", "model": model, "output_dir": str(tmp_path / name), "seed": 0, "lora": {"rank": 4},
            "data": {"images": str(images), "random_flip": flip, "cache": cache},
            "self_npo": {"num_grid_steps": 3, "teacher_steps": 1},
            "train": {"resolution": 32, "batch_size": 2, "max_steps": 3, "checkpoint_every": 0, "learning_rate": 1e-3},
            "logging": {"sample_every": 0},
        })
        trainer = SelfNPOTrainer(cfg)
        trainer.train()
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)], trainer

    plain, _ = run("plain", "none")
    cached, trainer = run("cached", "memory")
    assert trainer.cache is not None and len(trainer.cache) == 3 and len(plain) == 3
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=2e-4, atol=1e-6)
    with pytest.raises(UserError, match="with data.prompts .data-free. there is nothing to cache"):
        load_config({"method": "self_npo", "model": model, "data": {"prompts": ["a"], "cache": "memory"}})


def test_two_processes_share_one_memory_cache_encoded_on_the_main_process(tmp_path):
    """data.cache=memory under two (gloo) processes: the main process encodes, the other receives
    the same tensors; training then runs and the ranks' LoRAs stay identical."""
    from conftest import run_two_processes

    result = run_two_processes(__file__, str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"data.cache=memory: 8 pairs and \d+ prompts encoded on the main process, sent to 2 processes",
                     result.stdout + result.stderr)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["encoded_here"] and not ranks[1]["encoded_here"]  # only rank 0 ran the VAE encoder
    assert ranks[0]["cache"] == ranks[1]["cache"] and ranks[0]["lora"] == ranks[1]["lora"]


def _two_process_worker(out: Path) -> None:
    from diffalign import latent_cache
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return latent_cache.encode_pairs(*args, **kwargs)

    load = latent_cache.load_pair_cache  # the trainer imports it when it starts: count this rank's encodes
    latent_cache.load_pair_cache = lambda *a, **k: load(*a, **{**k, "encode": counting})
    cfg = _dpo(out, "tiny-sd", "run", **{"data.cache": "memory", "train.max_steps": 2})
    trainer = DiffusionDPOTrainer(cfg, overwrite=True)
    trainer.train()
    import torch.distributed as dist

    cache = trainer.cache
    digest = [round(float(cache.get(f"{i}.plain.chosen").double().sum()), 6) for i in range(len(cache))]
    lora = {n: round(float(p.detach().double().sum()), 8) for n, p in trainer.policy.denoiser.named_parameters()
            if p.requires_grad}
    rank = dist.get_rank() if dist.is_initialized() else 0
    (out / f"rank{rank}.json").write_text(json.dumps({"encoded_here": bool(calls), "cache": digest, "lora": lora}))


if __name__ == "__main__":
    import sys

    _two_process_worker(Path(sys.argv[1]))
