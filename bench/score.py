"""Throughput of a reward: batched calls, a per-image loop, and the raw model forward alone.

    python bench/score.py --reward pickscore                     # tiny weights, CPU, runs anywhere
    python bench/score.py --reward hpsv2 --size full --device cuda   # published architecture, random weights
    python bench/score.py --reward clip --size small                 # ViT-B/32 with random weights, on a CPU
    python bench/score.py --reward "pickscore:model=/models/PickScore_v1" --device cuda

``--remote`` also starts ``diffalign serve-reward`` with the same reward in a second process and
measures the ``remote`` client against it: ``remote / in-process`` is the share of in-process
throughput left after HTTP, the wire format and the server's batching (goal: >= 0.8 at batch 32).
It is measured twice: one request per call (the client's default; the server scores it in batches
of ``--batch-size``) and requests of ``--batch-size`` images, each paying its own round trip. On a
CPU the client and the server share the cores, so this is the worst case for the ratio::

    python bench/score.py --reward brightness --remote --batch-size 32 --resolution 256
    python bench/score.py --reward clip --remote --batch-size 32 --resolution 256
    python bench/score.py --reward clip --size small --remote --batch-size 32 --resolution 64 --images 64

With ``--size small`` (or ``full``) ``--remote`` saves the random CLIP to a temporary folder in
open_clip's hub layout and serves ``clip:model=<that folder>``: the same weights on both sides.

``--size``: ``tiny`` (default) loads the tiny weights; ``small`` builds ViT-B/32 towers with random
weights (clip, aesthetic, hpsv2), big enough that the model's compute dominates on a CPU; ``full``
builds the published architecture (ViT-L/14, ViT-H/14, PickScore's CLIP-H) with random
weights, so the timings are those of the real model without downloading it. The raw forward is the
model alone on inputs prepared in advance (preprocessed pixels, token ids); ``batched / raw`` is the
share of the model's throughput the reward keeps after its own preprocessing, tokenisation and
batching (goal: >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from diffalign.rewards import Reward, load_reward, parse_reward_spec  # noqa: E402
from diffalign.rewards.registry import get_reward_entry  # noqa: E402
from diffalign.rewards.tiny import TINY_REWARDS, tiny_reward_options  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse on mars", "a red apple on a wooden table, studio light",
           "a watercolor painting of a lighthouse at dawn", "two corgis playing in the snow, 35mm film"]


def open_clip_arch(name: str, size: str) -> str:
    """The open_clip architecture :func:`build_full` builds for ``name`` at ``size``."""
    return "ViT-B-32" if size == "small" else {"clip": "ViT-L-14", "hpsv2": "ViT-H-14", "aesthetic": "ViT-L-14"}[name]


def build_full(name: str, device: str, dtype: str, batch_size: int, size: str = "full") -> Reward:
    """The published architecture of ``name`` (``size="small"``: ViT-B/32 towers) with random
    weights, wrapped in the real reward class."""
    import open_clip

    from diffalign.rewards.aesthetic import AestheticHead, AestheticScore
    from diffalign.rewards.clip import OpenClipScore
    from diffalign.rewards.image_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from diffalign.rewards.weights import freeze, resolve_dtype

    torch_dtype = resolve_dtype(dtype, device, name)
    common = {"batch_size": batch_size, "bt_scale": 1.0, "dtype": torch_dtype}
    if name in ("clip", "hpsv2", "aesthetic"):
        arch = open_clip_arch(name, size)
        model = freeze(open_clip.create_model(arch, pretrained=None))
        preprocess = {"size": 224, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, "interpolation": "bicubic",
                      "resize_mode": "longest" if name == "hpsv2" else "shortest"}
        if name == "aesthetic":
            width = 512 if size == "small" else 768
            return AestheticScore(model, preprocess, freeze(AestheticHead(width)), **common).to(device)
        return OpenClipScore(name, model, open_clip.get_tokenizer(arch), preprocess, scale=1.0, **common).to(device)
    if size == "small":
        raise SystemExit(f"--size small builds ViT-B/32 towers for clip, hpsv2 and aesthetic; not {name!r}")
    if name == "pickscore":
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

        from diffalign.rewards.pickscore import PickScore
        from diffalign.rewards.tiny import clip_bpe_tokenizer

        config = CLIPConfig(  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K, which PickScore fine-tunes
            text_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                         "num_attention_heads": 16, "hidden_act": "gelu", "eos_token_id": 49407},
            vision_config={"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                           "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "hidden_act": "gelu"},
            projection_dim=1024)
        processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224},
                                  crop_size={"height": 224, "width": 224}, resample=3), tokenizer=clip_bpe_tokenizer())
        return PickScore(freeze(CLIPModel(config)), processor, **common).to(device)
    if name == "vlm":
        return build_full_vlm(device, torch_dtype, batch_size)
    raise SystemExit(f"--full supports clip, hpsv2, aesthetic, pickscore, vlm; not {name!r}")


def build_full_vlm(device: str, dtype: torch.dtype, batch_size: int) -> Reward:
    """Qwen2.5-VL-7B-Instruct's architecture (8.3 B parameters) with random weights, built on ``device``,
    with the tiny byte-level tokenizer and Qwen's default image-processor pixel bounds."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    from diffalign.rewards.tiny import _QWEN_CHAT_TEMPLATE, qwen_byte_tokenizer
    from diffalign.rewards.vlm import POINTWISE_QUESTION, PAIRWISE_QUESTION, VLMJudge

    tokenizer = qwen_byte_tokenizer()
    pixels = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=_QWEN_CHAT_TEMPLATE)
    ids = {n: tokenizer.convert_tokens_to_ids(f"<|{n}|>") for n in ("image_pad", "video_pad", "vision_start", "vision_end")}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                     "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}},
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    return VLMJudge(model, processor, labels=("A", "B"), answers=("Yes", "No"), pairwise_question=PAIRWISE_QUESTION,
                    pointwise_question=POINTWISE_QUESTION, system_prompt=None, image_size=None,
                    batch_size=batch_size, bt_scale=1.0).to(device)


def raw_forward(reward: Reward, images: torch.Tensor, prompts: list[str]) -> Callable[[int, int], None]:
    """Inputs prepared once; returns ``run(start, stop)`` doing only the model forward on that slice."""
    name = reward.name
    if name in ("clip", "hpsv2"):
        pixels, tokens = reward.pixel_values(images), reward.tokens(prompts, reward.device)
        return lambda a, b: (reward.model.encode_image(pixels[a:b]), reward.model.encode_text(tokens[a:b]))
    if name == "aesthetic":
        pixels = reward.pixel_values(images)
        return lambda a, b: reward.embed(pixels[a:b])
    if name == "pickscore":
        pixels, text = reward.pixel_values(images), reward.text_inputs(prompts, reward.device)
        return lambda a, b: reward.embed(pixels[a:b], {k: v[a:b] for k, v in text.items()})
    if name == "vlm":
        step = reward.batch_size
        prepared = []
        for start in range(0, len(prompts), step):
            conversations = [reward.pointwise_messages(p) for p in prompts[start : start + step]]
            inputs = reward.prepare(conversations, list(images[start : start + step].float().cpu()))
            inputs = {k: v.to(reward.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(reward.model.dtype)
            prepared.append(inputs)
        return lambda a, b: reward.model(**prepared[a // step], logits_to_keep=1)
    if hasattr(reward, "rule"):  # rule-based: the image function alone, without checks and chunking
        return lambda a, b: reward.rule(images[a:b])
    raise SystemExit(f"no raw forward defined for reward {name!r}")


def throughput(fn: Callable[[], object], count: int, device: torch.device, repeats: int) -> float:
    """Images per second of ``fn`` (which processes ``count`` images): best of ``repeats`` after a warm-up."""
    return interleaved([fn], count, device, repeats)[0]


def interleaved(fns: list[Callable[[], object]], count: int, device: torch.device, repeats: int) -> list[float]:
    """Images per second of each of ``fns``, measured in turn within each repeat (best of
    ``repeats`` after a warm-up), so that all of them see the same state of a shared machine."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[index] = min(best[index], time.perf_counter() - start)
    return [count / seconds for seconds in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="pickscore", help="reward spec (default pickscore)")
    parser.add_argument("--size", choices=["tiny", "small", "full"], default="tiny",
                        help="tiny weights | ViT-B/32 random | the published architecture, random (see above)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16")
    parser.add_argument("--images", type=int, default=64, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512, help="input images are resolution x resolution")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remote", action="store_true", help="also measure the reward through diffalign serve-reward")
    parser.add_argument("--encoding", default="uint8", help="remote wire encoding: uint8 | float32 | png")
    args = parser.parse_args()

    name, options = parse_reward_spec(args.reward)
    if args.size != "tiny":
        reward = build_full(name, args.device, args.dtype, args.batch_size, args.size)
    else:
        if name in TINY_REWARDS and "model" not in options:
            options = {**tiny_reward_options(name), **options}
        accepted = get_reward_entry(name).options or ()
        extra = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size}
        reward = load_reward({name: options}, **{k: v for k, v in extra.items() if k in accepted and k not in options})
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, args.resolution, args.resolution, generator=generator).to(device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    n, step = args.images, args.batch_size

    with torch.no_grad():
        batched = throughput(lambda: reward(images, prompts), n, device, args.repeats)
        loop_n = min(n, 16)
        looped = throughput(lambda: [reward(images[i : i + 1], prompts[i : i + 1]) for i in range(loop_n)],
                            loop_n, device, args.repeats)
        run = raw_forward(reward, images, prompts)
        raw = throughput(lambda: [run(a, a + step) for a in range(0, n, step)], n, device, args.repeats)

    weights = f"random {args.size}-size" if args.size != "tiny" else ("tiny" if name in TINY_REWARDS and "model" not in parse_reward_spec(args.reward)[1] else "given")
    print(f"reward {name} ({weights} weights) on {args.device}, {args.resolution}px inputs, batch {step}, "
          f"dtype {getattr(reward, 'dtype', 'n/a')}")
    print(f"  batched          {batched:10.1f} images/s")
    print(f"  per-image loop   {looped:10.1f} images/s")
    print(f"  raw forward      {raw:10.1f} images/s")
    print(f"  batched / raw    {batched / raw:10.3f}  (goal >= 0.9)")
    if args.remote:
        local, whole, split = remote_throughput(args, name, options, images, prompts, reward)
        print(f"  remote ({args.encoding}), diffalign serve-reward in a second process, max batch {step}, "
              f"measured in turn with in-process calls:")
        print(f"    in-process            {local:10.1f} images/s  (the batched call again, beside the idle server)")
        print(f"    one request per call  {whole:10.1f} images/s  (the client's default; the server cuts it into batches)")
        print(f"    requests of {step:<4}      {split:10.1f} images/s  (request_size={step}, 4 in flight)")
        print(f"  remote / in-process {whole / local:7.3f}  one request per call (goal >= 0.8)")
        print(f"  remote / in-process {split / local:7.3f}  requests of {step}: each pays the HTTP round trip")


def remote_throughput(args, name: str, options: dict, images: torch.Tensor, prompts: list[str],
                      reward: Reward) -> tuple[float, float, float]:
    """Images per second of the ``remote`` reward against a ``diffalign serve-reward`` subprocess
    serving the same reward spec (max batch = --batch-size): (in-process, one request per call,
    requests of --batch-size images), measured in turn in each repeat. On a shared CPU the speed of
    the machine drifts by 20-30% between runs; measured one after the other, the ratio moved with
    it (0.46-0.76 for the tiny CLIP over sessions), measured in turn it does not."""
    import re
    import subprocess

    from diffalign.rewards.registry import format_reward_spec

    folder = None
    if args.size != "tiny":  # the server loads the same random weights from an open_clip hub-layout folder
        if name != "clip":
            raise SystemExit("--remote with --size small/full serves clip only (its weights are saved for the server); "
                             "use --size tiny or a spec naming real weights")
        from open_clip import get_model_config

        from diffalign.rewards.clip import save_open_clip_folder

        folder = tempfile.TemporaryDirectory(prefix="bench-score-")
        save_open_clip_folder(reward.model, get_model_config(open_clip_arch(name, args.size)), reward.preprocess, folder.name)
        name, options = "clip", {"model": folder.name, "scale": 1.0, "batch_size": args.batch_size}
    elif "batch_size" in (get_reward_entry(name).options or ()):  # the server's reward scores batches of
        options = {"batch_size": args.batch_size, **options}  # --batch-size too, like the in-process one
    command = [sys.executable, "-m", "diffalign.cli", "serve-reward", format_reward_spec(name, options), "--port", "0",
               "--max-batch", str(args.batch_size), "--device", args.device]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = server.stdout.readline()
        match = re.search(r"on (http://[\w.]+:\d+)", banner)
        if not match:
            raise SystemExit(f"the reward server did not start: {banner}{server.stdout.read()}")
        spec = f"remote:url={match.group(1)},encoding={args.encoding}"
        whole, split = load_reward(spec), load_reward(f"{spec},request_size={args.batch_size}")
        with torch.no_grad():
            return tuple(interleaved([lambda c=client: c(images, prompts) for client in (reward, whole, split)],
                                     len(prompts), torch.device(args.device), args.repeats))
    finally:
        server.terminate()
        server.wait(timeout=60)
        if folder is not None:
            folder.cleanup()


if __name__ == "__main__":
    main()
