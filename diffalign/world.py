"""Pretrain, measure and ship the shapes-world models (``diffalign world build``).

One pretraining loop for every family, written only against the Policy contract:
``encode_images`` -> ``noise`` / ``target`` / ``predict`` -> MSE, on batches of world images and
their captions (10% of captions replaced by "" so classifier-free guidance works). The denoiser
and the text encoders train together; the shapes VAE is fixed (exact on world images).

A build writes a standard diffusers folder (denoiser and text encoders stored in fp16, the VAE
in fp32) plus ``manifest.json``: the command, seed, steps, a content hash over every file and
the base scores measured on the reloaded folder. Same seed, steps and thread count give the
same files.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from diffalign.errors import UserError
from diffalign.files import new_folder

if TYPE_CHECKING:  # torch and numpy load inside the functions, so the CLI starts fast
    import torch

MANIFEST = "manifest.json"
# The CFG scale the shapes models sample at by default: their single-object scores fall as CFG
# grows (the guidance away from "", whose images hold 1-4 objects, removes objects).
SHAPES_GUIDANCE = 1.5
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "shapes"


@dataclass
class WorldBuildConfig:
    """How one shapes model is pretrained and measured.

    family: sd | sdxl | flux | sd3. seed: weights, captions, images and noise all follow it.
    steps, batch_size, learning_rate, warmup_steps: AdamW (weight decay 0, gradient norm clipped
    at 1), linear warm-up then cosine decay to 10%. caption_dropout: share of "" captions.
    sample_steps, guidance_scale: how the base scores are measured (deterministic sampler).
    eval_seeds: images per prompt for the base scores. threads: torch CPU threads (part of what
    makes a build reproducible). init: continue pretraining from this shapes folder (its manifest's
    steps become ``start_step``, so the data stream goes on where it stopped). timesteps: how
    training noise levels are drawn, ``uniform`` or ``logit_normal`` (flow families only; None: the
    policy's default, logit-normal for FLUX/SD3 and uniform for SD/SDXL). caption_weights: how often
    each GenEval category's captions are drawn, as ``"color_attr=3,position=2"`` (a category not
    named weighs 1; None: all equally often). adaln_zero: start a FLUX/SD3 transformer with its
    modulation and output layers at zero (DiT's adaLN-Zero) instead of diffusers' default init.
    vae_downsample: the shapes VAE's downsampling, 4 (None: the default) or, for a new FLUX/SD3
    model, 2: one transformer token per 4 x 4-pixel cell instead of one per 2 x 2 cells.
    """

    family: str
    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    sample_steps: int = 20
    guidance_scale: float = SHAPES_GUIDANCE
    eval_seeds: int = 4
    threads: int = 2
    init: str | None = None
    start_step: int = 0
    timesteps: str | None = None
    caption_weights: str | None = None
    adaln_zero: bool | None = None
    vae_downsample: int | None = None


def parse_caption_weights(text: str | None) -> dict[str, float] | None:
    """``"color_attr=3,position=2"`` -> {"color_attr": 3.0, "position": 2.0}; a one-line error
    naming the option for an unknown category or a weight that is not a positive number."""
    from diffalign.rewards.geneval_rules import TAGS

    if not text:
        return None
    weights = {}
    for item in text.split(","):
        tag, _, value = item.strip().partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if tag not in TAGS or not (weight > 0 and math.isfinite(weight)):
            raise UserError(f"world build: --caption-weights {text!r}: {item.strip()!r} is not CATEGORY=WEIGHT with "
                            f"CATEGORY one of {', '.join(TAGS)} and WEIGHT a positive number, e.g. color_attr=3")
        weights[tag] = weight
    return weights


def policy_options(family: str) -> dict:
    """Policy options the shapes models run with (their short T5 sequences)."""
    from diffalign.world_models import T5_LENGTH

    return {"max_sequence_length": T5_LENGTH} if family in ("flux", "sd3") else {}


def world_policy(pipe, family: str):
    from diffalign.pipelines.loading import policy_for
    from diffalign.rewards.shapes_world import IMAGE_SIZE

    return policy_for(pipe, resolution=IMAGE_SIZE, **policy_options(family))


def _trainable_modules(pipe) -> list:
    import torch

    return [m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module) and name != "vae"]


def world_batch(captions: Sequence[str], seeds: Sequence[int]) -> "torch.Tensor":
    """World images of ``captions`` drawn with ``seeds``: [B, 3, 64, 64] in [-1, 1]."""
    import numpy as np
    import torch

    from diffalign.rewards.shapes_world import draw

    arrays = np.stack([draw(c, int(s)) for c, s in zip(captions, seeds)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1


def _print(line: str) -> None:
    print(line, flush=True)


def pretrain(pipe, config: WorldBuildConfig, log: Callable[[str], None] = _print) -> list[float]:
    """Train ``pipe``'s denoiser and text encoders on the world in place; returns the losses."""
    import numpy as np
    import torch

    from diffalign.rewards.shapes_world import sample_captions

    policy = world_policy(pipe, config.family)
    modules = _trainable_modules(pipe)
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(config.seed)
    # The policy's prompt encoding with gradients (its public method runs under no_grad).
    encode = type(policy).encode_prompts.__wrapped__
    scheme = {"scheme": config.timesteps} if config.timesteps else {}  # else the policy's default
    tag_weights = parse_caption_weights(config.caption_weights)
    losses, start = [], time.time()
    for step in range(config.steps):
        # 1. a batch of world images and captions
        index = config.start_step + step
        captions = sample_captions(config.batch_size, seed=config.seed * 1_000_003 + index, tag_weights=tag_weights)
        seeds = [config.seed * 1_000_003 + index * config.batch_size + i for i in range(config.batch_size)]
        with torch.no_grad():
            latents = policy.encode_images(world_batch(captions, seeds), generator=generator)
        drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        prompts = ["" if d else c for c, d in zip(captions, drop.tolist())]
        # 2. the denoising loss of the family (epsilon or flow velocity)
        cond = encode(policy, prompts)
        noise = torch.randn(latents.shape, generator=generator)
        t = policy.training_timesteps(config.batch_size, generator=generator, **scheme)
        prediction = policy.predict(policy.noise(latents, noise, t), t, cond)
        loss = torch.nn.functional.mse_loss(prediction, policy.target(latents, noise, t))
        # 3. update
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == config.steps:
            log(f"[{config.family}] step {step + 1}/{config.steps}  loss {np.mean(losses[-100:]):.4f}  "
                f"{time.time() - start:.0f}s")
    for p in params:
        p.requires_grad_(False)
    return losses


def sample_world(policy, prompts: Sequence[str], seeds: Sequence[int], num_steps: int = 20,
                 guidance_scale: float = SHAPES_GUIDANCE, batch_size: int = 32) -> "torch.Tensor":
    """Deterministic samples (DDIM eta 0 / flow ODE): [N, 3, 64, 64] in [0, 1]; image i starts from
    the noise of ``seeds[i]``, so base and trained models can be compared image by image."""
    import torch

    with torch.no_grad():
        return _sample_world(policy, prompts, seeds, num_steps, guidance_scale, batch_size)


def _sample_world(policy, prompts, seeds, num_steps, guidance_scale, batch_size):
    import torch

    images = []
    for start in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = list(prompts[start:start + batch_size]), seeds[start:start + batch_size]
        cond = policy.encode_prompts(chunk, with_uncond=True)
        shape = policy.latent_shape(policy.default_resolution(), policy.default_resolution())
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in chunk_seeds])
        out = policy.sample(cond, num_steps, guidance_scale=guidance_scale, noise_level=0.0, latents=noise.to(policy.device))
        images.append(out.images.float().cpu())
    return torch.cat(images)


def measure(policy, config: WorldBuildConfig) -> dict:
    """Mean strict ``shapes_geneval`` on the in-distribution single-object prompts, all training
    prompts, and the held-out compositional prompts (``eval_seeds`` images each, seeds 0..n-1)."""
    from diffalign.rewards import load_reward
    from diffalign.rewards.shapes_world import HELD_OUT_COMPOSITIONAL_PROMPTS, SINGLE_OBJECT_PROMPTS, TRAIN_PROMPTS

    reward = load_reward("shapes_geneval")
    scores = {}
    for name, prompts in (("single_object", SINGLE_OBJECT_PROMPTS), ("train", TRAIN_PROMPTS),
                          ("held_out_compositional", HELD_OUT_COMPOSITIONAL_PROMPTS)):
        repeated = [p for p in prompts for _ in range(config.eval_seeds)]
        seeds = [s for _ in prompts for s in range(config.eval_seeds)]
        images = sample_world(policy, repeated, seeds, config.sample_steps, config.guidance_scale)
        scores[name] = round(float(reward(images, repeated).mean()), 4)
    return scores


def content_hash(folder: Path) -> str:
    """sha256 over every file's relative path and bytes (the manifest excluded), in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def save_shapes_pipeline(pipe, out: Path) -> None:
    """``save_pretrained`` with the denoiser and text encoders in fp16 (the VAE stays fp32: its
    colour-preserving weights include 1e-5 gains below fp16's normal range)."""
    import torch

    for module in _trainable_modules(pipe):
        module.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    for module in _trainable_modules(pipe):
        module.to(torch.float32)
    drop_source_paths(out)


def drop_source_paths(folder: Path) -> None:
    """Remove the ``_name_or_path`` diffusers writes into ``model_index.json`` and each component's
    ``config.json`` (where the pipeline was loaded from: a stage folder of the build), so the files,
    and so the content hash, do not depend on where a build ran."""
    for path in [folder / "model_index.json", *sorted(folder.glob("*/config.json"))]:
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build(config: WorldBuildConfig, out_dir: str | Path, command: str | None = None,
          log: Callable[[str], None] = _print, measure_scores: bool = True) -> dict:
    """Build one shapes model from scratch into ``out_dir`` (which must not exist or be empty);
    returns its manifest. Writes into a temporary sibling and renames, so a failed build leaves
    nothing behind."""
    import numpy as np
    import torch

    from diffalign.pipelines.loading import load_pipeline
    from diffalign.world_models import FAMILIES, build_untrained

    if config.family not in FAMILIES:
        raise UserError(f"world build: --family {config.family!r} is not one of {', '.join(FAMILIES)}")
    if config.timesteps is not None and (config.family not in ("flux", "sd3")
                                         or config.timesteps not in ("uniform", "logit_normal")):
        raise UserError(f"world build: --timesteps {config.timesteps!r} is for --family flux or sd3 and is "
                        f"'uniform' or 'logit_normal'; leave it out for the family's default")
    parse_caption_weights(config.caption_weights)
    if config.adaln_zero and (config.family not in ("flux", "sd3") or config.init is not None):
        raise UserError("world build: --adaln-zero initialises a new FLUX/SD3 transformer; use it with --family flux "
                        "or sd3 and without --init")
    if config.vae_downsample not in (None, 4) and (config.family not in ("flux", "sd3") or config.init is not None
                                                   or config.vae_downsample != 2):
        raise UserError(f"world build: --vae-downsample {config.vae_downsample} is not allowed; a new FLUX/SD3 model "
                        f"(--family flux or sd3, no --init) takes 2 or 4, every other build 4")
    out = new_folder(out_dir, "world build")
    torch.set_num_threads(config.threads)
    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    try:
        if config.init is None:
            pipe = build_untrained(config.family, config.seed, adaln_zero=bool(config.adaln_zero),
                                   vae_downsample=config.vae_downsample or 4)
        else:
            pipe = load_pipeline(config.init)
            previous = json.loads((Path(config.init) / MANIFEST).read_text())
            config.start_step = previous["config"].get("start_step", 0) + previous["config"]["steps"]
        losses = pretrain(pipe, config, log)
        save_shapes_pipeline(pipe, tmp)
        manifest = {
            "name": f"shapes-{config.family}",
            "command": command or f"diffalign world build --family {config.family} --seed {config.seed} "
                                  f"--steps {config.steps} --out {out}",
            "config": asdict(config),
            "previous_stages": [] if config.init is None else previous.get("previous_stages", []) + [previous["command"]],
            "pipeline": type(pipe).__name__,
            "final_loss": round(float(np.mean(losses[-100:])), 5),
            "train_seconds": round(time.time() - start),
            "torch": torch.__version__,
        }
        if measure_scores:
            reloaded = load_pipeline(str(tmp))
            manifest["base_scores"] = measure(world_policy(reloaded, config.family), config)
            manifest["base_scores_note"] = (f"strict shapes_geneval, {config.eval_seeds} seeds per prompt, "
                                            f"{config.sample_steps} deterministic steps, guidance {config.guidance_scale}")
        manifest["content_sha256"] = content_hash(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out}: {json.dumps(manifest.get('base_scores', {}))}")
    return manifest


RECIPE_OPTIONS = ("seed", "steps", "batch_size", "learning_rate", "threads", "eval_seeds", "guidance_scale", "timesteps",
                  "caption_weights", "adaln_zero", "vae_downsample")


def add_build_arguments(parser) -> None:
    """The options of ``diffalign world build``: with none of ``RECIPE_OPTIONS`` (and no --init),
    the shipped model's recipe; with any of them, one stage whose other options take
    :class:`WorldBuildConfig`'s defaults."""
    parser.add_argument("--family", required=True, help="sd | sdxl | flux | sd3")
    parser.add_argument("--out", required=True, help="a new or empty folder for the diffusers model")
    for field in RECIPE_OPTIONS:
        if field == "adaln_zero":
            parser.add_argument("--adaln-zero", action="store_const", const=True, default=None,
                                help="FLUX/SD3: zero the transformer's modulation and output layers at the start "
                                     "(DiT's adaLN-Zero; default: diffusers' init)")
            continue
        kind = float if field in ("learning_rate", "guidance_scale") else int
        kind = str if field in ("timesteps", "caption_weights") else kind
        default = f"{getattr(WorldBuildConfig, field)} in a custom build"
        if field == "timesteps":
            default = "uniform | logit_normal, FLUX/SD3 only; in a custom build the policy's, logit_normal"
        if field == "caption_weights":
            default = "CATEGORY=WEIGHT,... over GenEval's six categories, e.g. color_attr=3; in a custom build all 1"
        if field == "vae_downsample":
            default = "4, or 2 for a new FLUX/SD3 model: one transformer token per 4x4-pixel cell"
        parser.add_argument("--" + field.replace("_", "-"), type=kind, default=None,
                            help=f"(default: the shipped recipe's; {default})")
    parser.add_argument("--init", help="continue pretraining from this shapes folder (a build in stages)")


def _stage_config(args, init: str | None) -> WorldBuildConfig:
    given = {field: getattr(args, field) for field in RECIPE_OPTIONS if getattr(args, field) is not None}
    if "caption_weights" in given:  # one spelling, so the recorded stage command parses back to it
        weights = parse_caption_weights(given["caption_weights"])
        given["caption_weights"] = ",".join(f"{tag}={weight:g}" for tag, weight in weights.items())
    return WorldBuildConfig(family=args.family, init=init, **given)


def _stage_command(config: WorldBuildConfig) -> str:
    return (f"diffalign world build --family {config.family} --seed {config.seed} --steps {config.steps} "
            f"--batch-size {config.batch_size} --learning-rate {config.learning_rate:g} --threads {config.threads} "
            f"--eval-seeds {config.eval_seeds} --guidance-scale {config.guidance_scale:g}"
            + (f" --timesteps {config.timesteps}" if config.timesteps else "")
            + (f" --caption-weights {config.caption_weights}" if config.caption_weights else "")
            + (" --adaln-zero" if config.adaln_zero else "")
            + (f" --vae-downsample {config.vae_downsample}" if config.vae_downsample else "") + " --out DIR"
            + (f" --init {config.init}" if config.init else ""))


def recipe_commands(manifest: dict) -> list[str]:
    """The build commands a manifest records, first stage first."""
    return list(manifest.get("previous_stages", [])) + [manifest["command"]]


def _shipped_manifest(family: str) -> dict:
    """The manifest of the shipped ``shapes-<family>`` (a one-line error for an unknown family)."""
    from diffalign.world_models import FAMILIES

    if family not in FAMILIES:
        raise UserError(f"world build: --family {family!r} is not one of {', '.join(FAMILIES)}")
    path = SHIPPED_DIR / f"shapes-{family}" / MANIFEST
    if not path.is_file():
        raise UserError(f"world build: no shipped shapes-{family} to take a recipe from ({path} is missing); "
                        f"give --steps (and the other options) for a custom build")
    return json.loads(path.read_text())


def build_shipped(family: str, out_dir: str | Path, log: Callable[[str], None] = _print,
                  measure_scores: bool = True) -> dict:
    """Rebuild the shipped ``shapes-<family>`` from scratch: every stage of its recipe in turn (the
    earlier ones in a hidden sibling folder, removed at the end, their scores not measured), the
    last into ``out_dir``; then compare the content hash with the shipped one. Returns the manifest."""
    import argparse
    import shlex

    out = new_folder(out_dir, "world build")  # checked now, not after the earlier stages' hours
    shipped = _shipped_manifest(family)
    commands = recipe_commands(shipped)
    parser = argparse.ArgumentParser(prog="diffalign world build")
    add_build_arguments(parser)
    stages = [parser.parse_args(shlex.split(command)[3:]) for command in commands]
    work = out.parent / f".{out.name}.stages"
    shutil.rmtree(work, ignore_errors=True)
    start, previous = time.time(), None
    try:
        for k, (command, stage) in enumerate(zip(commands, stages), 1):
            last = k == len(stages)
            log(f"[{family}] stage {k}/{len(stages)}: {command}")
            manifest = build(_stage_config(stage, previous), out if last else work / f"stage{k}", command=command,
                             log=log, measure_scores=last and measure_scores)
            previous = str(work / f"stage{k}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = manifest["content_sha256"] == shipped["content_sha256"]
    log(f"[{family}] {len(stages)} stages in {time.time() - start:.0f}s; content hash {manifest['content_sha256'][:12]} "
        + ("matches the shipped weights" if same else
           f"differs from the shipped {shipped['content_sha256'][:12]} (built with torch {shipped.get('torch', '?')}; "
           "a different torch build, CPU or version of the build code gives different files); its base scores are "
           "in its manifest"))
    return manifest


def run_build(args) -> int:
    """``diffalign world build``: the shipped recipe (no recipe options) or one custom stage;
    pretrain, measure, write DIR + manifest."""
    if args.init is None and all(getattr(args, field) is None for field in RECIPE_OPTIONS):
        build_shipped(args.family, args.out)
        return 0
    config = _stage_config(args, args.init)
    build(config, args.out, command=_stage_command(config))
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m diffalign.world --family sd --out DIR``: the same as ``diffalign world build``."""
    import argparse

    parser = argparse.ArgumentParser(prog="diffalign world build")
    add_build_arguments(parser)
    run_build(parser.parse_args(argv))


if __name__ == "__main__":
    main()
