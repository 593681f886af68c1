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
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from diffalign.errors import UserError

from .base import Reward, check_images, check_pair, to_device_async
from .registry import register_reward
from .weights import freeze, missing_weights_error, resolve_device, resolve_dtype

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
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        extra = {"size": self.image_size} if self.image_size else {}
        return self.processor(text=texts, images=images, return_tensors="pt", padding=True, do_rescale=False, **extra)

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


@register_reward("vlm", differentiable=False)
def build_vlm(model: str = DEFAULT_MODEL, processor: str | None = None, labels: Sequence[str] = ("A", "B"),
              answers: Sequence[str] = ("Yes", "No"), pairwise_question: str = PAIRWISE_QUESTION,
              pointwise_question: str = POINTWISE_QUESTION, system_prompt: str | None = None,
              min_pixels: int | None = None, max_pixels: int | None = None, batch_size: int = 4,
              device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False, bt_scale: float = 1.0) -> Reward:
    """VLM preference judge. ``model``: hub id or local HF directory of an image-text-to-text chat model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(device, "vlm")
    torch_dtype = resolve_dtype(dtype, device, "vlm")
    try:
        # loaded tensor by tensor straight onto the device: a 7B judge is never whole in CPU memory
        vlm = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype, device_map={"": device},
                                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise missing_weights_error("vlm", model, "model", "/path/to/dir", error) from error
    try:
        vlm_processor = AutoProcessor.from_pretrained(processor or model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise missing_weights_error("vlm", processor or model, "processor", "/path/to/dir", error) from error
    image_size = None
    if min_pixels is not None or max_pixels is not None:
        default = dict(vlm_processor.image_processor.size)
        image_size = {"shortest_edge": min_pixels or default.get("shortest_edge"),
                      "longest_edge": max_pixels or default.get("longest_edge")}
    judge = VLMJudge(freeze(vlm), vlm_processor, labels=labels, answers=answers, pairwise_question=pairwise_question,
                     pointwise_question=pointwise_question, system_prompt=system_prompt, image_size=image_size,
                     batch_size=batch_size, bt_scale=bt_scale)
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


def _check_template(template: str, option: str, **fields: str) -> str:
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(f"reward 'vlm': {option} has a bad placeholder ({error}); allowed: "
                        f"{', '.join('{' + k + '}' for k in fields)}") from error
    if "{prompt}" not in template:
        raise UserError(f"reward 'vlm': {option} must contain {{prompt}}")
    return template
