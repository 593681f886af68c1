"""Human feedback for D3PO: ``diffalign sample`` writes image pairs to label; training reads the labels.

    diffalign sample configs/d3po/sd15.yaml --out feedback/ [--num-pairs 64] [--lora runs/x/final]

writes into ``feedback/``:

* ``trajectories.safetensors``: every sampled chain (``latents [N, 2, T+1, C, h, w]``,
  ``log_probs [N, 2, T]``, ``timesteps [T]``, ``next_timesteps [T]``) and, in its header, how they
  were sampled (model, steps, guidance, noise level, size, prompts, pair ids);
* ``images/<pair_id>-0.png`` and ``images/<pair_id>-1.png``: the two images of each pair
  (same prompt, same starting noise);
* ``labels.jsonl``: one line per pair, ``{"pair_id", "prompt", "image_0", "image_1", "choice": null}``.

A person sets ``choice`` to 0 or 1 (the preferred image), or leaves it null / writes "tie" to
skip the pair. Training with ``d3po.labels: feedback/labels.jsonl`` re-scores the recorded chains
under the policy and the reference; a label naming a pair that is not in the trajectories file
is an error that names it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from diffalign.errors import UserError

# torch and safetensors are imported where used, so that `diffalign --help` starts fast.

TRAJECTORIES_FILE = "trajectories.safetensors"
LABELS_FILE = "labels.jsonl"
FORMAT = "diffalign-d3po-feedback"
METADATA_KEY = "diffalign_feedback"
SKIP_CHOICES = (None, "", "tie", "skip")


# --- writing a round of pairs ---------------------------------------------------------------


def write_feedback_round(
    policy, cfg, out_dir: str | os.PathLike, num_pairs: int | None = None, seed: int | None = None,
    batch_size: int = 4, lora_dir: str | None = None,
) -> Path:
    """Sample ``num_pairs`` pairs (prompts of ``cfg.d3po.prompts`` in order, cycled; default one
    pair per prompt) with the D3PO sampler settings of ``cfg`` and write them to ``out_dir``.
    Returns the labels file."""
    import torch

    with torch.no_grad():
        return _write_feedback_round(policy, cfg, out_dir, num_pairs, seed, batch_size, lora_dir)


def _write_feedback_round(policy, cfg, out_dir, num_pairs, seed, batch_size, lora_dir) -> Path:
    import safetensors.torch
    import torch
    from PIL import Image

    from diffalign.data import load_prompts
    from diffalign.sampling import guidance_or_default, noise_level_or_default, sample_pairs

    d = cfg.d3po
    guidance = guidance_or_default(d.guidance_scale, policy.family)
    noise_level = noise_level_or_default(d.noise_level, policy.family)
    prompts = load_prompts(cfg.d3po.prompts, key="d3po.prompts")
    num_pairs = num_pairs or len(prompts)
    seed = cfg.seed if seed is None else seed
    out = Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    pair_prompts = [prompts[i % len(prompts)] for i in range(num_pairs)]
    pair_ids = [f"{i:06d}" for i in range(num_pairs)]

    latents, log_probs, timesteps, next_timesteps = [], [], None, None
    (out / "images").mkdir(parents=True, exist_ok=True)
    for start in range(0, num_pairs, batch_size):
        chunk = pair_prompts[start : start + batch_size]
        trajectory = sample_pairs(policy, chunk, generator, d.num_steps, guidance, noise_level, d.negative_prompt)
        latents.append(trajectory.latents.view(len(chunk), 2, *trajectory.latents.shape[1:]).cpu())
        log_probs.append(trajectory.log_probs.view(len(chunk), 2, -1).cpu())
        timesteps, next_timesteps = trajectory.timesteps.cpu(), trajectory.next_timesteps.cpu()
        pixels = (trajectory.images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        for row, array in enumerate(pixels.numpy()):
            pair_id = pair_ids[start + row // 2]
            Image.fromarray(array).save(out / "images" / f"{pair_id}-{row % 2}.png")

    size = policy.default_resolution()
    meta = {
        "format": FORMAT, "version": 1, "model": cfg.model, "family": policy.family,
        "num_steps": d.num_steps, "guidance_scale": guidance,
        "noise_level": noise_level, "negative_prompt": cfg.d3po.negative_prompt,
        "height": size, "width": size, "seed": seed, "lora": lora_dir,
        "lora_sha256": lora_fingerprint(lora_dir),
        "pair_ids": pair_ids, "prompts": pair_prompts,
    }
    tensors = {
        "latents": torch.cat(latents).contiguous(), "log_probs": torch.cat(log_probs).contiguous(),
        "timesteps": timesteps.float().contiguous(), "next_timesteps": next_timesteps.float().contiguous(),
    }
    from diffalign.files import tensors_bytes, write_file

    write_file(out / TRAJECTORIES_FILE, tensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(meta)}))  # umask, not 0600
    lines = [
        json.dumps({"pair_id": pid, "prompt": prompt, "image_0": f"images/{pid}-0.png",
                    "image_1": f"images/{pid}-1.png", "choice": None})
        for pid, prompt in zip(pair_ids, pair_prompts)
    ]
    labels = out / LABELS_FILE
    labels.write_text("\n".join(lines) + "\n")
    return labels


# --- reading labelled pairs -------------------------------------------------------------------


@dataclass
class LabelledPairs:
    """Recorded pairs a person labelled, ready to be re-scored in batches.

    ``rows``: each labelled pair's row in the trajectories file; ``winners``: 0 or 1 per pair.
    """

    trajectories: Path
    meta: dict
    rows: list[int] = field(default_factory=list)
    winners: list[int] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_steps(self) -> int:
        return int(self.meta["num_steps"])

    def batch(self, policy, indices: list[int], negative: bool = False):
        """(trajectory of 2B chains, pairs adjacent, winner [B]) for labelled pairs ``indices``;
        the prompts are re-encoded with the sampling-time guidance settings."""
        from diffalign.pipelines.base import Trajectory
        from diffalign.sampling import sampling_conditioning

        import safetensors
        import torch

        rows = [self.rows[i] for i in indices]
        with safetensors.safe_open(str(self.trajectories), framework="pt") as f:
            latents = torch.cat([f.get_slice("latents")[r : r + 1] for r in rows])
            log_probs = torch.cat([f.get_slice("log_probs")[r : r + 1] for r in rows])
            timesteps, next_timesteps = f.get_tensor("timesteps"), f.get_tensor("next_timesteps")
        if policy.prediction_type != "flow":  # integer DDPM timesteps index the scheduler's alphas
            timesteps, next_timesteps = timesteps.long(), next_timesteps.long()
        prompts = [self.meta["prompts"][r] for r in rows]
        guidance = float(self.meta["guidance_scale"])
        cond = sampling_conditioning(policy, prompts, guidance, self.meta["negative_prompt"],
                                     self.meta["height"], self.meta["width"])
        device = policy.device
        trajectory = Trajectory(
            latents=latents.flatten(0, 1).to(device), log_probs=log_probs.flatten(0, 1).to(device),
            timesteps=timesteps.to(device), next_timesteps=next_timesteps.to(device),
            cond=cond.repeat_interleave(2), guidance_scale=guidance, noise_level=float(self.meta["noise_level"]),
        )
        winner = torch.tensor([self.winners[i] for i in indices], dtype=torch.long)
        return trajectory, (1 - winner) if negative else winner


def _choice(value, where: str, pair_id: str) -> int | None:
    if isinstance(value, str):
        value = value.strip().lower()
    if value in SKIP_CHOICES:
        return None
    if value in (0, 1, "0", "1") and not isinstance(value, bool):
        return int(value)
    raise UserError(
        f"{where}: choice {value!r} for pair {pair_id}: write 0 or 1 (the preferred image), or \"tie\" / null to skip"
    )


def lora_fingerprint(lora_dir: str | os.PathLike | None) -> str | None:
    """sha256 of a LoRA's weights file (None for none): which LoRA sampled a round of pairs."""
    if lora_dir is None:
        return None
    from diffalign.lora import LORA_WEIGHT_NAME

    path = Path(lora_dir)
    path = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no LoRA at {lora_dir}: expected {LORA_WEIGHT_NAME} (written by diffalign train)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_labelled_pairs(
    labels_path: str | os.PathLike, policy=None, model: str | None = None, init_lora: str | None = None,
) -> LabelledPairs:
    """Read ``labels.jsonl`` and the ``trajectories.safetensors`` next to it.

    Every mistake is a one-line UserError naming the file, line and pair: a missing file, a
    pair id the trajectories do not hold, a bad choice, a duplicate pair, no usable label,
    pairs sampled from another model than ``model``, or from another LoRA than the run's
    ``init_lora`` (D3PO trains the model that sampled the pairs: ``diffalign sample --lora X``
    pairs need ``init_lora: X``, base-model pairs no init_lora).
    """
    labels = Path(labels_path)
    if not labels.is_file():
        raise UserError(f"d3po.labels: {labels} not found; write it with `diffalign sample CONFIG --out DIR`")
    trajectories = labels.parent / TRAJECTORIES_FILE
    if not trajectories.is_file():
        raise UserError(f"d3po.labels: {trajectories} not found next to {labels}; `diffalign sample` writes both")
    import safetensors

    with safetensors.safe_open(str(trajectories), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    if meta.get("format") != FORMAT:
        raise UserError(f"d3po.labels: {trajectories} was not written by `diffalign sample`")
    if model is not None and meta["model"] != model:
        raise UserError(
            f"d3po.labels: the pairs in {labels.parent} were sampled from model {meta['model']!r}, but model is "
            f"{model!r}; train the model they came from or sample new pairs"
        )
    sampled_with = meta.get("lora")
    if lora_fingerprint(init_lora) != meta.get("lora_sha256"):
        if sampled_with:
            raise UserError(
                f"d3po.labels: the pairs in {labels.parent} were sampled from {meta['model']} + LoRA {sampled_with}; "
                f"set init_lora={sampled_with} so D3PO trains the model that sampled them"
                + (f" (init_lora={init_lora} is another LoRA)" if init_lora else "")
            )
        raise UserError(
            f"d3po.labels: the pairs in {labels.parent} were sampled from the base model {meta['model']}, but "
            f"init_lora={init_lora}; drop init_lora or sample new pairs with `diffalign sample ... --lora {init_lora}`"
        )
    if policy is not None and meta["family"] != policy.family:
        raise UserError(f"d3po.labels: pairs from a {meta['family']} model cannot train a {policy.family} model")
    row_of = {pid: row for row, pid in enumerate(meta["pair_ids"])}
    pairs = LabelledPairs(trajectories, meta)
    seen: set[str] = set()
    from diffalign.data import read_text_lines

    for lineno, line in enumerate(read_text_lines(labels, "d3po.labels"), start=1):
        if not line.strip():
            continue
        where = f"{labels}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or "pair_id" not in record:
            raise UserError(f"{where}: each line needs a pair_id and a choice")
        pair_id = str(record["pair_id"])
        if pair_id not in row_of:
            raise UserError(
                f"{where}: pair_id {pair_id!r} is not in {trajectories} ({len(row_of)} pairs, "
                f"{meta['pair_ids'][0]}..{meta['pair_ids'][-1]}); was the file edited or copied from another round?"
            )
        if pair_id in seen:
            raise UserError(f"{where}: pair_id {pair_id!r} is labelled twice")
        seen.add(pair_id)
        choice = _choice(record.get("choice"), where, pair_id)
        if choice is None:
            pairs.skipped += 1
            continue
        pairs.rows.append(row_of[pair_id])
        pairs.winners.append(choice)
    if not pairs.rows:
        raise UserError(f"d3po.labels: no pair in {labels} has a choice yet; set \"choice\" to 0 or 1 for the preferred image")
    return pairs


# --- the `diffalign sample` command -----------------------------------------------------------


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``diffalign sample CONFIG --out DIR``."""
    parser.add_argument("config", help="a D3PO recipe (method: d3po); its model, prompts and sampler settings are used")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. d3po.num_steps=30 model=/path")
    parser.add_argument("--out", required=True, help="folder for trajectories.safetensors, images/ and labels.jsonl")
    parser.add_argument("--num-pairs", type=int, help="pairs to sample (default: one per prompt)")
    parser.add_argument("--seed", type=int, help="noise seed (default: the config's seed)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs sampled at once")
    parser.add_argument("--lora", help="sample from this LoRA (e.g. the final/ of an earlier round; default: the "
                        "recipe's init_lora); train on the labels with init_lora set to it")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing labels round in --out")


def run_sample(args: argparse.Namespace) -> int:
    """``diffalign sample``: write a round of pairs to label; prints where the labels file is."""
    from diffalign import lora
    from diffalign.config import load_config
    from diffalign.pipelines.loading import load_policy
    from diffalign.run import WEIGHT_DTYPES

    cfg = load_config(args.config, args.overrides)
    if cfg.method != "d3po":
        raise UserError(f"diffalign sample: {args.config} is a {cfg.method} recipe; give a D3PO recipe (method: d3po)")
    if args.num_pairs is not None and args.num_pairs < 1:
        raise UserError(f"--num-pairs must be at least 1, got {args.num_pairs}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = Path(args.out)
    if (out / LABELS_FILE).exists() or (out / TRAJECTORIES_FILE).exists():
        if not args.overwrite:
            raise UserError(f"--out {out} already holds a labels round; pass --overwrite to replace it (labels are lost)")
        shutil.rmtree(out)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_policy(cfg.model, device=device, torch_dtype=WEIGHT_DTYPES[cfg.train.mixed_precision],
                         resolution=cfg.train.resolution)
    lora_dir = args.lora or cfg.init_lora  # the recipe's init_lora samples too, unless --lora names another
    if lora_dir:
        lora.load_lora(policy.denoiser, lora_dir)
    labels = write_feedback_round(policy, cfg, out, args.num_pairs, args.seed, args.batch_size, lora_dir)
    count = sum(1 for line in labels.read_text().splitlines() if line.strip())
    print(f"wrote {count} pairs to {out}: images in {out / 'images'}, labels to fill in {labels}")
    print(f'set "choice" to 0 or 1 (the preferred image; "tie" or null skips), then train with d3po.reward=null '
          f"d3po.labels={labels}" + (f" init_lora={lora_dir}" if lora_dir else ""))
    return 0
