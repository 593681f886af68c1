"""``vlm``: a vision-language model as a preference judge (Qwen2.5-VL by default).

Pairwise (``compare``), as in Pref-GRPO's pairwise judges: show both images, ask which is better, and
read the next-token probabilities of the two answer labels (default ``A`` / ``B``), renormalised over
just those two tokens. VLMs favour one position, so every pair is asked in both orders and averaged:

    P(a > b) = 1/2 * [ P(first | a, b) + P(second | b, a) ]

which makes ``compare(a, b) + compare(b, a) = 1`` exactly.

Pointwise (``__call__``): ``P(yes)`` renormalised over the two answers (default ``Yes`` / ``No``) to a
question about how well the image depicts the prompt, in [0, 1].

Templates are ``str.format`` strings with ``{prompt}`` and the answer labels (``{first}``/``{second}``
or ``{yes}``/``{no}``). Not differentiable (the processor resizes in PIL/numpy space).

``unifiedreward``: the same judge with UnifiedReward's published templates and answer format
(Wang et al. 2025, CodeGoat24/UnifiedReward, ``inference_qwen/image_generation/qwen_pair_rank_image_generation.py``
and ``qwen_point_score_image_generation.py``; default model ``CodeGoat24/UnifiedReward-qwen-7b``). The
model writes its answer (greedy decoding), which is parsed: pairwise, ``Image 1 is better`` -> 1,
``Image 2 is better`` -> 0, ``Both images are equally good`` -> 0.5, asked in both orders and averaged
as above; pointwise, the number after ``Final Score:`` on UnifiedReward's 1-5 scale, mapped to [0, 1]
as (score - 1) / 4. An answer in neither form counts as 0.5 and is counted (``judge.off_format`` of
``judge.answers``, with a warning); a call with more than ``max_off_format`` of them raises.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from diffalign.errors import UserError

from .base import Reward, check_images, check_pair, to_device_async
from .registry import register_reward
from .weights import freeze, load_onto, missing_weights_error, resolve_device, resolve_dtype

log = logging.getLogger("diffalign.rewards.vlm")

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
PAIRWISE_QUESTION = (
    'Both images were generated for the prompt: "{prompt}". Which image is better: more faithful to the '
    "prompt, more aesthetically pleasing, and with fewer artifacts? Answer with a single letter, {first} or {second}."
)
POINTWISE_QUESTION = (
    'Does this image faithfully depict the prompt "{prompt}" with good visual quality? Answer {yes} or {no}.'
)


class VLMJudge(Reward):
    """Pairwise and pointwise preference judge on an ``AutoModelForImageTextToText`` chat model.

    Args:
        model, processor: the loaded VLM (eval mode) and its ``AutoProcessor``.
        labels: the two answer labels of the pairwise question, naming the first and second image.
        answers: the positive and negative answer of the pointwise question.
        pairwise_question, pointwise_question: templates (see module docstring).
        system_prompt: optional system message.
        image_size: optional ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}`` for the processor.
    """

    def __init__(self, model: torch.nn.Module, processor: Any, *, labels: Sequence[str], answers: Sequence[str],
                 pairwise_question: str, pointwise_question: str, system_prompt: str | None,
                 image_size: dict[str, int] | None, batch_size: int, bt_scale: float) -> None:
        super().__init__("vlm", differentiable=False, batch_size=batch_size, bt_scale=bt_scale)
        self.model = model
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # the answer is read at the last position of every row
        self.labels = tuple(labels)
        self.answers = tuple(answers)
        self.label_ids = _answer_token_ids(processor.tokenizer, self.labels, "labels")
        self.answer_ids = _answer_token_ids(processor.tokenizer, self.answers, "answers")
        self.pairwise_question = _check_template(pairwise_question, "pairwise_question", prompt="", first="A", second="B")
        self.pointwise_question = _check_template(pointwise_question, "pointwise_question", prompt="", yes="Yes", no="No")
        self.system_prompt = system_prompt
        self.image_size = image_size

    # ------------------------------------------------------------------ conversations
    def _messages(self, content: list[dict[str, str]]) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}] if self.system_prompt else []
        return system + [{"role": "user", "content": content}]

    def pairwise_messages(self, prompt: str) -> list[dict[str, Any]]:
        first, second = self.labels
        question = self.pairwise_question.format(prompt=prompt, first=first, second=second)
        return self._messages([{"type": "text", "text": f"Image {first}:"}, {"type": "image"},
                               {"type": "text", "text": f"Image {second}:"}, {"type": "image"},
                               {"type": "text", "text": question}])

    def pointwise_messages(self, prompt: str) -> list[dict[str, Any]]:
        yes, no = self.answers
        question = self.pointwise_question.format(prompt=prompt, yes=yes, no=no)
        return self._messages([{"type": "image"}, {"type": "text", "text": question}])

    # ------------------------------------------------------------------ the model call
    def prepare(self, conversations: list[list[dict]], images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """CPU side: chat template, tokenisation and the processor's image patches for one chunk.

        images: all images of all conversations in order, each [3, H, W] float in [0, 1] on the CPU.
        """
        return chat_inputs(self.processor, conversations, images, self.image_size)

    def answer_probability(self, inputs: dict[str, torch.Tensor], token_ids: tuple[int, int]) -> torch.Tensor:
        """GPU side: P(first answer token) renormalised over the two answer tokens at the last position. -> [n]"""
        inputs = {key: to_device_async(value, self.device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]  # left padding: the answer slot is last
        return logits[:, list(token_ids)].float().softmax(dim=-1)[:, 0]

    def first_answer_probability(self, conversations: list[list[dict]], images: list[torch.Tensor],
                                 token_ids: tuple[int, int]) -> torch.Tensor:
        """P(first answer) renormalised over the two answer tokens, one row per conversation.

        Args:
            conversations: chat messages, each with as many ``{"type": "image"}`` parts as it uses.
            images: all images of all conversations in order, each [3, H, W] in [0, 1].
            token_ids: ids of the first and second answer token.

        Returns:
            [len(conversations)] float32 on the reward's device.
        """
        with torch.no_grad():
            return self.answer_probability(self.prepare(conversations, [i.detach().float().cpu() for i in images]), token_ids)

    def _pipelined(self, jobs: list[tuple[list, list[torch.Tensor]]], token_ids: tuple[int, int]) -> torch.Tensor:
        """Run chunks with the processor preparing chunk k+1 on a worker thread while the model scores chunk k."""
        if not jobs:
            return torch.zeros(0, device=self.device)
        results = []
        with torch.no_grad(), ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.prepare, *jobs[0])
            for index in range(len(jobs)):
                inputs = pending.result()
                if index + 1 < len(jobs):
                    pending = pool.submit(self.prepare, *jobs[index + 1])
                results.append(self.answer_probability(inputs, token_ids))
        return torch.cat(results)

    def forward(self, images: torch.Tensor, prompts: list[str], grad: bool | None = None) -> torch.Tensor:
        """Pointwise P(yes). images: [B, 3, H, W] in [0, 1]; returns [B] float32 on the reward's device."""
        check_images(images, prompts, self.name)
        self.wants_grad(grad, images)
        cpu_images = list(images.detach().float().cpu())  # one transfer; workers then touch no GPU memory
        step = self.batch_size or len(prompts)
        jobs = [([self.pointwise_messages(p) for p in prompts[i : i + step]], cpu_images[i : i + step])
                for i in range(0, len(prompts), step)]
        return self._pipelined(jobs, self.answer_ids)

    def compare(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str],
                grad: bool | None = None) -> torch.Tensor:
        """P(images_a[i] preferred to images_b[i]), averaged over both presentation orders. -> [B] in [0, 1]."""
        check_pair(images_a, images_b, prompts, self.name)
        self.wants_grad(grad, images_a, images_b)
        a, b = list(images_a.detach().float().cpu()), list(images_b.detach().float().cpu())
        step = self.batch_size or len(prompts)
        jobs, sizes = [], []
        for start in range(0, len(prompts), step):
            chunk, chunk_a, chunk_b = list(prompts[start : start + step]), a[start : start + step], b[start : start + step]
            # rows 0..n-1 show (a, b); rows n..2n-1 show (b, a)
            ordered = [img for pair in zip(chunk_a, chunk_b) for img in pair]
            swapped = [img for pair in zip(chunk_b, chunk_a) for img in pair]
            jobs.append(([self.pairwise_messages(p) for p in chunk] * 2, ordered + swapped))
            sizes.append(len(chunk))
        p_first = self._pipelined(jobs, self.label_ids)
        results, offset = [torch.zeros(0, device=self.device)], 0
        for n in sizes:
            rows = p_first[offset : offset + 2 * n]
            results.append(0.5 * (rows[:n] + (1.0 - rows[n:])))
            offset += 2 * n
        return torch.cat(results).float()


@register_reward("vlm", differentiable=False, weights="download: Qwen/Qwen2.5-VL-7B-Instruct")
def build_vlm(model: str = DEFAULT_MODEL, processor: str | None = None, labels: Sequence[str] = ("A", "B"),
              answers: Sequence[str] = ("Yes", "No"), pairwise_question: str = PAIRWISE_QUESTION,
              pointwise_question: str = POINTWISE_QUESTION, system_prompt: str | None = None,
              min_pixels: int | None = None, max_pixels: int | None = None, batch_size: int = 4,
              device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False, bt_scale: float = 1.0) -> Reward:
    """VLM preference judge. ``model``: hub id or local HF directory of an image-text-to-text chat model."""
    device = resolve_device(device, "vlm")
    vlm, vlm_processor, image_size = load_chat_vlm("vlm", model, processor, device, dtype, trust_remote_code,
                                                   min_pixels, max_pixels)
    judge = VLMJudge(freeze(vlm), vlm_processor, labels=labels, answers=answers, pairwise_question=pairwise_question,
                     pointwise_question=pointwise_question, system_prompt=system_prompt, image_size=image_size,
                     batch_size=batch_size, bt_scale=bt_scale)
    return judge.to(device)  # the model is already there; this moves the reward's empty device anchor


def chat_inputs(processor: Any, conversations: list[list[dict]], images: list[torch.Tensor],
                image_size: dict[str, int] | None) -> dict[str, torch.Tensor]:
    """Chat template + tokenisation + image patches for a chunk; images [3, H, W] in [0, 1] on the CPU, in order."""
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    extra = {"size": image_size} if image_size else {}
    return processor(text=texts, images=images, return_tensors="pt", padding=True, do_rescale=False, **extra)


def load_chat_vlm(name: str, model: str, processor: str | None, device: torch.device, dtype: str,
                  trust_remote_code: bool, min_pixels: int | None, max_pixels: int | None):
    """``(model, processor, image_size)`` for an image-text-to-text chat model, loaded onto ``device``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = resolve_dtype(dtype, device, name)
    try:
        # loaded tensor by tensor straight onto the device: a 7B judge is never whole in CPU memory
        vlm = AutoModelForImageTextToText.from_pretrained(model, **load_onto(device, torch_dtype),
                                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise missing_weights_error(name, model, "model", "/path/to/dir", error) from error
    try:
        vlm_processor = AutoProcessor.from_pretrained(processor or model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise missing_weights_error(name, processor or model, "processor", "/path/to/dir", error) from error
    image_size = None
    if min_pixels is not None or max_pixels is not None:
        default = dict(vlm_processor.image_processor.size)
        image_size = {"shortest_edge": min_pixels or default.get("shortest_edge"),
                      "longest_edge": max_pixels or default.get("longest_edge")}
    return freeze(vlm), vlm_processor, image_size


# ---------------------------------------------------------------------- UnifiedReward
UNIFIEDREWARD_MODEL = "CodeGoat24/UnifiedReward-qwen-7b"
UNIFIEDREWARD_PAIRWISE = (
    "You are given a text caption and two generated images based on that caption. Your task is to evaluate and "
    "compare these images based on two key criteria:\n1. Alignment with the Caption: Assess how well each image "
    "aligns with the provided caption. Consider the accuracy of depicted objects, their relationships, and "
    "attributes as described in the caption.\n2. Overall Image Quality: Examine the visual quality of each image, "
    "including clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nCompare both images "
    "using the above criteria and select the one that better aligns with the caption while exhibiting superior "
    "visual quality.\nProvide a clear conclusion such as \"Image 1 is better.\", \"Image 2 is better.\" and "
    "\"Both images are equally good.\"\nYour task is provided as follows:\nText Caption: [{prompt}]"
)
UNIFIEDREWARD_POINTWISE = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in the "
    "caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nExtract key elements from the provided text "
    "caption, evaluate their presence in the generated image using the format: 'element (type): value' (where "
    "value=0 means not generated, and value=1 means generated), and assign a score from 1 to 5 after 'Final "
    "Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)
UNIFIEDREWARD_CHOICES = {"Image 1 is better": 1.0, "Image 2 is better": 0.0, "Both images are equally good": 0.5}
UNIFIEDREWARD_SCALE = (1.0, 5.0)
_FINAL_SCORE = re.compile(r"Final Score\s*:\s*\**\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_unifiedreward_choice(answer: str) -> float | None:
    """P(first image better) from a pairwise answer: 1, 0 or 0.5 (tie); None when no conclusion, or two, is found."""
    found = {value for phrase, value in UNIFIEDREWARD_CHOICES.items() if phrase.lower() in answer.lower()}
    return found.pop() if len(found) == 1 else None


def parse_unifiedreward_score(answer: str) -> float | None:
    """The last ``Final Score: x`` of a pointwise answer, clamped to 1-5 and mapped to [0, 1]; None if absent."""
    matches = _FINAL_SCORE.findall(answer)
    if not matches:
        return None
    low, high = UNIFIEDREWARD_SCALE
    return (min(max(float(matches[-1]), low), high) - low) / (high - low)


class UnifiedRewardJudge(Reward):
    """A chat VLM that writes UnifiedReward-format answers, parsed into scores (see the module docstring).

    Args:
        model, processor: the loaded VLM (eval mode) and its ``AutoProcessor``.
        pairwise_question, pointwise_question: templates with ``{prompt}``.
        max_new_tokens: the answer's length limit (the reference generates up to 512).
        max_off_format: the largest share of unreadable answers a call tolerates.
    """

    def __init__(self, model: torch.nn.Module, processor: Any, *, pairwise_question: str, pointwise_question: str,
                 image_size: dict[str, int] | None, max_new_tokens: int, max_off_format: float, batch_size: int,
                 bt_scale: float) -> None:
        super().__init__("unifiedreward", differentiable=False, batch_size=batch_size, bt_scale=bt_scale)
        self.model = model
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its last position
        self.pairwise_question = _check_template(pairwise_question, "pairwise_question", "unifiedreward", prompt="")
        self.pointwise_question = _check_template(pointwise_question, "pointwise_question", "unifiedreward", prompt="")
        self.image_size = image_size
        self.max_new_tokens = int(max_new_tokens)
        self.max_off_format = float(max_off_format)
        self.answers = 0
        self.off_format = 0

    def pairwise_messages(self, prompt: str) -> list[dict[str, Any]]:
        """Both images, then the question, in one user turn (as the reference scripts)."""
        return [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": self.pairwise_question.format(prompt=prompt)}]}]

    def pointwise_messages(self, prompt: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": self.pointwise_question.format(prompt=prompt)}]}]

    def generate(self, conversations: list[list[dict]], images: list[torch.Tensor]) -> list[str]:
        """The model's greedy answers, one per conversation; images [3, H, W] in [0, 1], in order."""
        answers: list[str] = []
        step = self.batch_size or len(conversations)
        per_conversation = [sum(part["type"] == "image" for part in c[-1]["content"]) for c in conversations]
        offsets = [sum(per_conversation[:i]) for i in range(len(conversations) + 1)]
        with torch.no_grad():
            for start in range(0, len(conversations), step):
                stop = min(start + step, len(conversations))
                inputs = chat_inputs(self.processor, conversations[start:stop],
                                     [i.detach().float().cpu() for i in images[offsets[start]:offsets[stop]]], self.image_size)
                inputs = {key: to_device_async(value, self.device) for key, value in inputs.items()}
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
                output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
                new_tokens = output[:, inputs["input_ids"].shape[1]:]
                answers += self.processor.batch_decode(new_tokens, skip_special_tokens=True,
                                                       clean_up_tokenization_spaces=False)
        return answers

    def tally(self, answers: list[str], values: list[float | None], what: str) -> list[float]:
        """Unreadable answers count as 0.5 and are counted; past ``max_off_format`` of a call, a UserError."""
        bad = [a for a, v in zip(answers, values) if v is None]
        self.answers += len(answers)
        self.off_format += len(bad)
        if bad:
            message = f"{len(bad)} of {len(answers)} {what} answers were off-format (counted as 0.5), e.g. {bad[0][:80]!r}"
            if len(bad) / len(answers) > self.max_off_format:
                raise UserError(f"reward 'unifiedreward': {message}; above max_off_format={self.max_off_format:g}: "
                                f"is model a UnifiedReward checkpoint (e.g. {UNIFIEDREWARD_MODEL})?")
            log.warning("unifiedreward: %s (%d of %d answers off-format so far)", message, self.off_format, self.answers)
        return [0.5 if v is None else v for v in values]

    def forward(self, images: torch.Tensor, prompts: list[str], grad: bool | None = None) -> torch.Tensor:
        """Pointwise (Final Score - 1) / 4. images: [B, 3, H, W] in [0, 1]; returns [B] float32 on the reward's device."""
        check_images(images, prompts, self.name)
        self.wants_grad(grad, images)
        answers = self.generate([self.pointwise_messages(p) for p in prompts], list(images))
        values = self.tally(answers, [parse_unifiedreward_score(a) for a in answers], "pointwise")
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def compare(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str],
                grad: bool | None = None) -> torch.Tensor:
        """P(images_a[i] preferred), the mean of the (a, b) verdict and the flipped (b, a) one. -> [B] in [0, 1]."""
        check_pair(images_a, images_b, prompts, self.name)
        self.wants_grad(grad, images_a, images_b)
        conversations, images = [], []
        for prompt, a, b in zip(prompts, images_a, images_b):
            conversations += [self.pairwise_messages(prompt), self.pairwise_messages(prompt)]
            images += [a, b, b, a]
        answers = self.generate(conversations, images)
        values = self.tally(answers, [parse_unifiedreward_choice(a) for a in answers], "pairwise")
        return both_orders(values).to(self.device)


def both_orders(values: list[float]) -> torch.Tensor:
    """[v(a0,b0), v(b0,a0), v(a1,b1), ...] (P(first better) per order) -> P(a_i > b_i) = (v(a,b) + 1 - v(b,a)) / 2."""
    ordered, swapped = torch.tensor(values[0::2]), torch.tensor(values[1::2])
    return (0.5 * (ordered + (1.0 - swapped))).float()


@register_reward("unifiedreward", differentiable=False, weights="download: CodeGoat24/UnifiedReward-qwen-7b")
def build_unifiedreward(model: str = UNIFIEDREWARD_MODEL, processor: str | None = None,
                        pairwise_question: str = UNIFIEDREWARD_PAIRWISE, pointwise_question: str = UNIFIEDREWARD_POINTWISE,
                        max_new_tokens: int = 512, max_off_format: float = 0.5, min_pixels: int | None = None,
                        max_pixels: int | None = None, batch_size: int = 4, device: str = "cpu", dtype: str = "auto",
                        trust_remote_code: bool = False, bt_scale: float = 1.0) -> Reward:
    """UnifiedReward judge (pairwise ``compare`` and pointwise score). ``model``: hub id or local HF directory."""
    if not 0 <= float(max_off_format) <= 1:
        raise UserError(f"reward 'unifiedreward': max_off_format must be in [0, 1], got {max_off_format!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"reward 'unifiedreward': max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    device = resolve_device(device, "unifiedreward")
    vlm, vlm_processor, image_size = load_chat_vlm("unifiedreward", model, processor, device, dtype, trust_remote_code,
                                                   min_pixels, max_pixels)
    judge = UnifiedRewardJudge(vlm, vlm_processor, pairwise_question=pairwise_question,
                               pointwise_question=pointwise_question, image_size=image_size,
                               max_new_tokens=max_new_tokens, max_off_format=max_off_format, batch_size=batch_size,
                               bt_scale=bt_scale)
    return judge.to(device)  # the model is already there; this moves the reward's empty device anchor


def _answer_token_ids(tokenizer: Any, words: Sequence[str], option: str) -> tuple[int, int]:
    """The first token id of each of two answer words; they must differ."""
    if isinstance(words, str) or len(words) != 2:
        raise UserError(f"reward 'vlm': {option} must be two strings, got {words!r}")
    ids = []
    for word in words:
        tokens = tokenizer.encode(str(word), add_special_tokens=False)
        if not tokens:
            raise UserError(f"reward 'vlm': {option} entry {word!r} encodes to no tokens")
        ids.append(tokens[0])
    if ids[0] == ids[1]:
        raise UserError(f"reward 'vlm': {option} {list(words)} start with the same token; pick words that differ at once")
    return ids[0], ids[1]


def _check_template(template: str, option: str, reward: str = "vlm", **fields: str) -> str:
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(f"reward '{reward}': {option} has a bad placeholder ({error}); allowed: "
                        f"{', '.join('{' + k + '}' for k in fields)}") from error
    if "{prompt}" not in template:
        raise UserError(f"reward '{reward}': {option} must contain {{prompt}}")
    return template
