"""``hpsv2``: Human Preference Score v2.1 (Wu et al. 2023, arXiv 2306.09341).

    hpsv2(image, prompt) = cos(E_img(image), E_txt(prompt))            about 0.2 .. 0.35

The model is open_clip ViT-H-14 fine-tuned on HPD v2; the checkpoint (``{"state_dict": ...}``, the
open_clip training format) replaces all CLIP weights, so no LAION download is needed. Preprocessing
follows HPSv2's evaluation transform: resize the longer side to 224 (bicubic), pad to a square with
black, normalise with the OpenAI CLIP mean/std. The Bradley-Terry scale defaults to 100, CLIP's
logit scale, under which HPS was trained.
"""

from __future__ import annotations

from diffalign.errors import UserError

from .base import Reward
from .clip import OpenClipScore, load_open_clip
from .image_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .registry import register_reward
from .weights import load_state_dict_file, resolve_device, resolve_dtype, resolve_hub_file

HPS_CHECKPOINTS = {"2.1": "xswu/HPSv2/HPS_v2.1_compressed.pt", "2.0": "xswu/HPSv2/HPS_v2_compressed.pt"}


@register_reward("hpsv2", differentiable=True, weights="download: xswu/HPSv2 (HPS_v2.1_compressed.pt)")
def build_hpsv2(model: str = "ViT-H-14", checkpoint: str | None = None, version: str = "2.1", batch_size: int = 16,
                device: str = "cpu", dtype: str = "float32", bt_scale: float = 100.0) -> Reward:
    """HPS v2.x. ``model``: open_clip architecture name or a local open_clip dir (its config is used);
    ``checkpoint``: the HPS file, a local path or ``org/repo/filename`` (default by ``version``)."""
    version = str(version)
    if version not in HPS_CHECKPOINTS:
        raise UserError(f"reward 'hpsv2': version='{version}' is not one of {', '.join(HPS_CHECKPOINTS)}")
    device = resolve_device(device, "hpsv2")
    checkpoint_path = resolve_hub_file(checkpoint or HPS_CHECKPOINTS[version], "hpsv2", "checkpoint")
    clip_model, tokenizer, _ = load_open_clip("hpsv2", model, None, load_weights=False, device=device)
    state = load_state_dict_file(checkpoint_path, "hpsv2", "checkpoint", device=device)
    missing, unexpected = clip_model.load_state_dict(state, strict=False)
    del state  # the checkpoint's copy on the device; the model now holds the weights
    missing = [key for key in missing if key != "logit_bias"]
    if missing or unexpected:
        raise UserError(f"reward 'hpsv2': checkpoint='{checkpoint_path}' does not fit model='{model}' "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); HPS v2 needs ViT-H-14")
    size = clip_model.visual.image_size
    preprocess = {"size": size[0] if isinstance(size, (tuple, list)) else size, "mean": OPENAI_CLIP_MEAN,
                  "std": OPENAI_CLIP_STD, "interpolation": "bicubic", "resize_mode": "longest", "fill_color": 0}
    reward = OpenClipScore("hpsv2", clip_model, tokenizer, preprocess, scale=1.0, batch_size=batch_size,
                           bt_scale=bt_scale, dtype=resolve_dtype(dtype, device, "hpsv2"))
    return reward.to(device)  # the model is already there; this moves the reward's empty device anchor
