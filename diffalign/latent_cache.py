"""Cached VAE latents and text embeddings for the methods that train on a fixed data set
(``data.cache: memory | disk``): Diffusion-DPO, its SFT loss, Diffusion-NPO's DPO and Self-NPO
with image-caption data.

Each pair's images are encoded once, before the first step; each distinct prompt (and the empty
prompt) once. What is kept of an image is its **VAE posterior** (mean and log-variance, the
encoder's output) rather than one latent sample, so a step draws its latents from it with the
same generator call as ``policy.encode_images`` would: a cached run's losses equal an uncached
run's (up to float round-off between batch layouts), the VAE encoder simply does not run.

Augmentation: ``random_flip`` is kept exact by caching both the plain and the mirrored image's
posterior (the VAE is not mirror-symmetric), so the per-(epoch, pair) flip decision of
:func:`diffalign.data.collate_pairs` picks one of them. ``random_crop`` draws a new crop every
epoch and cannot be cached: a config error says so.

The cache key hashes everything the encoded values depend on: the model name, a fingerprint of
the VAE and text encoders (configs plus a sample of every weight tensor), the dtype, the
resolution, the crop/flip settings and the data (manifest bytes and the bytes of every image
file; for datasets, their content fingerprint and the rows used). ``disk`` writes safetensors
shards under ``data.cache_dir`` (default ``$DIFFALIGN_CACHE/latents``; written to a temporary
folder and renamed, so an interrupted build leaves nothing half-written) and reuses them on the
next run or resume with the same key; it is built once by the main process while the other
processes wait, then read (memory-mapped) by all. ``memory`` keeps the tensors in RAM on every
process: the main process encodes them and sends them to the others.

Size: per pair 2 (chosen, rejected) x 2 (flips) posteriors of 2C x h x w in the VAE dtype, e.g.
SDXL at 1024 px in bf16: 4 x 8 x 128 x 128 x 2 bytes = 1 MiB; per prompt its embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from diffalign.data import JsonlPairs, PairBatch, PairSubset, PickAPicPairs, _pair_generator, collate_pairs
from diffalign.errors import UserError

CACHE_VERSION = 1
SHARD_PAIRS = 256  # pairs per safetensors shard on disk
ENCODE_BATCH = 8  # pairs per VAE call while building


# --- fingerprints ------------------------------------------------------------------------------


def module_fingerprint(module: torch.nn.Module) -> str:
    """A cheap content hash of a module: its config, and the name, shape, dtype and first 256
    values of every parameter and buffer (a changed checkpoint changes some of them)."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(json.dumps(items, sort_keys=True, default=str).encode())
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(pairs: Any) -> str:
    """A hash of the data a pair set reads: manifest and image file bytes (JSONL), or the
    dataset's own content fingerprint and the rows used (Pick-a-Pic schema)."""
    digest = hashlib.sha256()
    if isinstance(pairs, PairSubset):
        digest.update(data_fingerprint(pairs.dataset).encode())
        digest.update(json.dumps(pairs.indices).encode())
    elif isinstance(pairs, JsonlPairs):
        digest.update(pairs.path.read_bytes())
        for row in pairs.rows:
            for key in ("chosen", "rejected"):
                path = pairs.path.parent / row[key]
                try:
                    digest.update(hashlib.sha1(path.read_bytes()).digest())
                except OSError as err:
                    raise UserError(f"{row['_where']}: cannot read image {path} ({err.strerror})") from err
    elif isinstance(getattr(pairs, "items", None), list):  # image-caption pairs (Self-NPO's ImageCaptions)
        for path, caption in pairs.items:
            digest.update(caption.encode())
            try:
                digest.update(hashlib.sha1(Path(path).read_bytes()).digest())
            except OSError as err:
                raise UserError(f"data.images: cannot read image {path} ({err.strerror})") from err
    elif isinstance(pairs, PickAPicPairs):
        digest.update(str(getattr(pairs.dataset, "_fingerprint", pairs.source)).encode())
        digest.update(json.dumps(pairs.indices).encode())
    else:
        raise UserError(f"data.cache: cannot fingerprint a {type(pairs).__name__}; use data.cache=none")
    return digest.hexdigest()


def cache_key(policy, model: str, pairs: Any, resolution: int, random_flip: bool, dtype: torch.dtype) -> str:
    """The hex key of a pair cache (see the module docstring for what it covers)."""
    parts = {
        "version": CACHE_VERSION, "model": model, "family": policy.family, "resolution": resolution,
        "random_flip": random_flip, "random_crop": False, "dtype": str(dtype),
        "components": [module_fingerprint(m) for m in policy.frozen_components()],
        "data": data_fingerprint(pairs), "count": len(pairs),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# --- the cache ----------------------------------------------------------------------------------


class PairCache:
    """Encoded pairs and prompts.

    ``tensors(key)`` returns a stored tensor: ``"{index}.{plain|flip}.{chosen|rejected}"`` (a VAE
    posterior [2C, h, w]) or ``"prompt.{j}.{field}"`` (one row of a :class:`Conditioning` field);
    ``meta`` holds per-pair sizes and crops, the prompt index and the shared ``text_ids``.
    """

    def __init__(self, get: Callable[[str], Tensor], meta: dict, where: str) -> None:
        self.get = get
        self.meta = meta
        self.where = where
        self.prompt_index = {p: j for j, p in enumerate(meta["prompts"])}

    def __len__(self) -> int:
        return self.meta["count"]

    def batch(self, indices: Sequence[int], seed: int, epoch: int, random_flip: bool) -> PairBatch:
        """The :class:`PairBatch` ``collate_pairs`` would give, with VAE posteriors in place of
        pixels (``encoded=True``); the same flip for the same (seed, epoch, pair)."""
        chosen, rejected, sizes_c, sizes_r, crops_c, crops_r, prompts = [], [], [], [], [], [], []
        for index in indices:
            flip = random_flip and bool(torch.rand((), generator=_pair_generator(seed, epoch, index)) < 0.5)
            view = "flip" if flip else "plain"
            chosen.append(self.get(f"{index}.{view}.chosen"))
            rejected.append(self.get(f"{index}.{view}.rejected"))
            info = self.meta["pairs"][index]
            prompts.append(info["prompt"])
            sizes_c.append(tuple(info["sizes"][0])); sizes_r.append(tuple(info["sizes"][1]))
            crops_c.append(tuple(info["crops"][0])); crops_r.append(tuple(info["crops"][1]))
        return PairBatch(prompts, torch.stack(chosen), torch.stack(rejected), sizes_c + sizes_r, crops_c + crops_r,
                         encoded=True)

    def conditioning(self, prompts: Sequence[str], device: torch.device, with_uncond: bool = False):
        """``policy.encode_prompts(prompts, with_uncond=...)`` from the stored rows, on ``device``
        (the unconditional branch is the same row for every prompt: the pipeline's empty prompt)."""
        from diffalign.pipelines.base import _BATCHED_FIELDS, Conditioning

        rows = []
        for prompt in prompts:
            j = self.prompt_index.get(prompt)
            if j is None:
                raise UserError(f"data.cache {self.where}: prompt {prompt[:60]!r} is not in the cache; rebuild it "
                                "(delete the folder) or set data.cache=none")
            rows.append(j)

        def stacked(keys: list[str]) -> dict[str, Tensor]:
            return {f: torch.stack([self.get(f"{key}.{f}") for key in keys]).to(device)
                    for f in _BATCHED_FIELDS if f in self.meta["fields"]}

        fields = stacked([f"prompt.{j}" for j in rows])
        uncond = stacked(["prompt.uncond"] * len(rows)) if with_uncond else None
        text_ids = self.meta.get("text_ids")
        for branch in (fields, uncond):
            if text_ids is not None and branch is not None:
                branch["text_ids"] = torch.tensor(text_ids, dtype=torch.float32, device=device)
        return Conditioning(**fields, uncond=None if uncond is None else Conditioning(**uncond))

    def image(self, index: int, flip: bool) -> tuple[Tensor, str, tuple[int, int], tuple[int, int]]:
        """Image-caption item ``index`` (see :func:`encode_captions`): (posterior [2C, h, w], prompt,
        original size, crop top-left), as ``ImageCaptions.load`` gives pixels."""
        info = self.meta["pairs"][index]
        posterior = self.get(f"{index}.{'flip' if flip else 'plain'}.image")
        return posterior, info["prompt"], tuple(info["sizes"][0]), tuple(info["crops"][0])


def encode_pairs(policy, pairs: Any, resolution: int, random_flip: bool, autocast: Callable[[], Any],
                 show_progress: bool = True) -> tuple[dict[str, Tensor], dict]:
    """Encode every pair (and, with ``random_flip``, its mirror) and every prompt: (tensors, meta)."""
    from tqdm.auto import tqdm

    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"version": CACHE_VERSION, "count": len(pairs), "pairs": [], "random_flip": random_flip}
    prompts: dict[str, None] = {"": None}  # the empty prompt too, for dpo.empty_prompt_fraction
    views = ("plain", "flip") if random_flip else ("plain",)
    bar = tqdm(total=len(pairs), desc="caching latents", unit="pair", disable=not show_progress, leave=False)
    with torch.no_grad():
        for start in range(0, len(pairs), ENCODE_BATCH):
            indices = list(range(start, min(start + ENCODE_BATCH, len(pairs))))
            batch = collate_pairs(pairs, indices, resolution, 0, 0, False, False)
            n = len(indices)
            pixels = torch.cat([batch.chosen, batch.rejected]).to(policy.device)
            for view in views:
                with autocast():
                    posterior = policy.vae_posterior(pixels.flip(-1) if view == "flip" else pixels).cpu()
                for k, index in enumerate(indices):
                    tensors[f"{index}.{view}.chosen"] = posterior[k].contiguous()
                    tensors[f"{index}.{view}.rejected"] = posterior[n + k].contiguous()
            for k, prompt in enumerate(batch.prompts):
                prompts.setdefault(prompt, None)
                meta["pairs"].append({"prompt": prompt, "sizes": [batch.original_sizes[k], batch.original_sizes[n + k]],
                                      "crops": [batch.crops_top_left[k], batch.crops_top_left[n + k]]})
            bar.update(n)
        bar.close()
    encode_prompt_table(policy, list(prompts), autocast, tensors, meta)
    return tensors, meta


def encode_captions(policy, images: Any, resolution: int, random_flip: bool, autocast: Callable[[], Any],
                    show_progress: bool = True) -> tuple[dict[str, Tensor], dict]:
    """Encode every image of an image-caption set (Self-NPO's ``data.images``; ``images.load(i,
    resolution, flip)`` gives pixels) and its mirror with ``random_flip``, and every caption."""
    from tqdm.auto import tqdm

    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"version": CACHE_VERSION, "count": len(images), "pairs": [], "random_flip": random_flip}
    prompts: dict[str, None] = {}
    views = (("plain", False), ("flip", True)) if random_flip else (("plain", False),)
    with torch.no_grad():
        for index in tqdm(range(len(images)), desc="caching latents", unit="image", disable=not show_progress,
                          leave=False):
            for view, flip in views:
                pixels, prompt, size, crop = images.load(index, resolution, flip)
                with autocast():
                    tensors[f"{index}.{view}.image"] = policy.vae_posterior(pixels[None].to(policy.device))[0].cpu()
            prompts.setdefault(prompt, None)
            meta["pairs"].append({"prompt": prompt, "sizes": [size], "crops": [crop]})
    encode_prompt_table(policy, list(prompts), autocast, tensors, meta)
    return tensors, meta


def encode_prompt_table(policy, prompts: list[str], autocast: Callable[[], Any], tensors: dict[str, Tensor],
                        meta: dict) -> None:
    """Add each prompt's conditioning rows (``prompt.{j}.{field}``) and the unconditional branch's
    row (``prompt.uncond.{field}``) to ``tensors``; the prompt list and field names to ``meta``."""
    meta["prompts"] = prompts
    meta["fields"] = []
    with torch.no_grad():
        for start in range(0, len(prompts), 32):
            chunk = prompts[start : start + 32]
            with autocast():
                cond = policy.encode_prompts(chunk, with_uncond=start == 0)
            rows = {f"prompt.{start + k}": cond.select(slice(k, k + 1)) for k in range(len(chunk))}
            if start == 0:
                rows["prompt.uncond"] = cond.uncond.select(slice(0, 1))
            for key, row in rows.items():
                for field in ("embeds", "pooled", "time_ids", "guidance"):
                    value = getattr(row, field)
                    if value is None:
                        continue
                    if field not in meta["fields"]:
                        meta["fields"].append(field)
                    tensors[f"{key}.{field}"] = value[0].detach().cpu().contiguous()
            if cond.text_ids is not None:
                meta["text_ids"] = cond.text_ids.detach().float().cpu().tolist()


def _shard_of(key: str) -> str:
    head = key.split(".", 1)[0]
    return "prompts" if head == "prompt" else f"pairs-{int(head) // SHARD_PAIRS:05d}"


def _write_disk_cache(folder: Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write ``folder`` atomically: shards and meta.json into a temporary sibling, then rename."""
    import safetensors.torch

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        shards: dict[str, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            shards.setdefault(_shard_of(key), {})[key] = value
        for shard, part in shards.items():
            safetensors.torch.save_file(part, str(tmp / f"{shard}.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"data.cache=disk: cannot write the cache under {folder.parent} ({err.strerror}); "
                        "free space, set data.cache_dir, or use data.cache=memory") from err


def _open_disk_cache(folder: Path) -> PairCache:
    from safetensors import safe_open

    try:
        meta = json.loads((folder / "meta.json").read_text())
        handles = {p.stem: safe_open(str(p), framework="pt") for p in folder.glob("*.safetensors")}
    except (OSError, ValueError) as err:
        raise UserError(f"data.cache: the cache {folder} is unreadable ({err}); delete that folder to rebuild it") from err

    def get(key: str) -> Tensor:
        return handles[_shard_of(key)].get_tensor(key)

    return PairCache(get, meta, str(folder))


def default_cache_dir() -> Path:
    """``$DIFFALIGN_CACHE/latents`` (default ``~/.cache/diffalign/latents``)."""
    return Path(os.environ.get("DIFFALIGN_CACHE", Path.home() / ".cache" / "diffalign")) / "latents"


def load_pair_cache(run, policy, cfg, pairs: Any, resolution: int, encode=encode_pairs, what: str = "pairs") -> PairCache:
    """The run's :class:`PairCache` for ``pairs`` (``cfg.data.cache``: memory or disk), built by
    ``encode`` (:func:`encode_pairs`, or :func:`encode_captions` for image-caption sets) with a
    progress bar or, on disk, reused when one with the same key exists."""
    data = cfg.data
    autocast = run.accelerator.autocast
    if data.cache == "memory":
        if run.num_processes == 1:
            tensors, meta = encode(policy, pairs, resolution, data.random_flip, autocast, run.is_main)
        else:  # encoded once, on the main process, then sent to every other process
            from accelerate.utils import broadcast_object_list

            payload = [encode(policy, pairs, resolution, data.random_flip, autocast) if run.is_main else None]
            tensors, meta = broadcast_object_list(payload, from_process=0)[0]
        cache = PairCache(tensors.__getitem__, meta, "in memory")
        run.print(f"data.cache=memory: {len(pairs)} {what} and {len(meta['prompts'])} prompts encoded"
                  + (f" on the main process, sent to {run.num_processes} processes" if run.num_processes > 1 else ""))
        return cache
    root = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    folder = root / cache_key(policy, cfg.model, pairs, resolution, data.random_flip, policy.vae.dtype)
    with run.accelerator.main_process_first():
        if run.is_main and not (folder / "meta.json").is_file():
            tensors, meta = encode(policy, pairs, resolution, data.random_flip, autocast)
            _write_disk_cache(folder, tensors, meta)
            run.print(f"data.cache=disk: wrote {len(pairs)} encoded {what} to {folder}")
        elif run.is_main:
            run.print(f"data.cache=disk: reusing {folder}")
    return _open_disk_cache(folder)

