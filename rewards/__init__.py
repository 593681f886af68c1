"""diffalign.rewards: every scorer behind one signature.

    reward = load_reward("pickscore")                       # or "vlm:model=...", {"composite": {...}}
    scores = reward(images, prompts)                        # images [B, 3, H, W] in [0, 1] -> [B] float32
    p_a = reward.compare(images_a, images_b, prompts)       # P(a preferred), [B] in [0, 1]

Registered: clip, aesthetic, pickscore, hpsv2, hpsv3, imagereward, vlm, unifiedreward, ocr, geneval, brightness, saturation, target_color,
jpeg_compressibility, jpeg_incompressibility, composite, shapes_geneval and shapes_pref (the shapes world's
verifiable and learned rewards), remote (a `diffalign serve-reward` server), openai_judge (a VLM judge behind
any OpenAI-compatible chat endpoint). Model libraries (open_clip, transformers)
are imported only when a reward that needs them is built.
"""

from .base import Reward
from .registry import (
    format_reward_spec,
    is_differentiable_spec,
    list_rewards,
    load_reward,
    options_taken,
    parse_reward_spec,
    register_reward,
    require_differentiable,
    spec_uses_prompts,
)

# Importing the scorer modules registers them; none of them imports a model library at module level.
from . import aesthetic, clip, composite, hps, ocr, openai_judge, pickscore, remote, rules, shapes_geneval, shapes_pref, vlm  # noqa: E402,F401  isort: skip
from . import geneval, hpsv3, imagereward  # noqa: E402,F401  isort: skip

__all__ = [
    "Reward",
    "format_reward_spec",
    "is_differentiable_spec",
    "list_rewards",
    "load_reward",
    "options_taken",
    "parse_reward_spec",
    "register_reward",
    "require_differentiable",
    "spec_uses_prompts",
]
