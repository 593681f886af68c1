"""``openai_judge``: a VLM judge behind any OpenAI-compatible chat endpoint (vLLM, SGLang, TGI, ...).

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000          # on other GPUs
    reward: "openai_judge:url=http://127.0.0.1:8000/v1,model=Qwen/Qwen2.5-VL-7B-Instruct"

The 7B judge then never shares the training GPU, and its dependencies never meet the trainer's.
Images travel as base64 PNG ``image_url`` parts of a ``/chat/completions`` request.

* Pointwise (``__call__``): the judge answers a score on ``score_range`` (default 0-10); the first
  number in its answer, clamped to the range, is mapped linearly to [0, 1].
* Pairwise (``compare``): the judge sees both images and names the better one by its label
  (default ``A`` / ``B``). Every pair is asked in both orders and averaged, so the judge's position
  bias cancels and ``compare(a, b) + compare(b, a) = 1``:
  P(a > b) = 1/2 [1(first wins | a, b) + 1(second wins | b, a)].

Requests run ``concurrency`` at a time on a shared connection pool; each is retried on connection
errors, timeouts and 5xx with exponential backoff (see :func:`~diffalign.rewards.remote.request_with_retries`),
and an endpoint that stays down is a one-line :class:`UserError`. An answer that cannot be read
(no number, no label) counts as a tie (0.5) and is counted: ``judge.off_format`` and
``judge.answers`` keep the totals, a warning names how many of a call were off-format with an
example, and a call where more than ``max_off_format`` of the answers are off-format raises.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from diffalign.errors import UserError

from .base import Reward, check_images, check_pair
from .registry import register_reward
from .remote import _to_uint8, request_with_retries

log = logging.getLogger("diffalign.rewards.openai_judge")

POINTWISE_QUESTION = (
    'Rate how well this image depicts the prompt "{prompt}", considering faithfulness, aesthetics and '
    "artifacts, on a scale from {low} to {high}. Answer with the number only."
)
PAIRWISE_QUESTION = (
    'Both images were generated for the prompt: "{prompt}". Which image is better: more faithful to the '
    "prompt, more aesthetically pleasing, and with fewer artifacts? Answer with a single letter, {first} or {second}."
)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


class OpenAIJudge(Reward):
    """Pointwise and pairwise judge over an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        url: the API base, e.g. ``http://127.0.0.1:8000/v1`` (requests go to ``url + /chat/completions``).
        model: the served model name.
        api_key: sent as ``Authorization: Bearer ...`` when not empty.
        labels, score_range, pointwise_question, pairwise_question, system_prompt: the conversation.
        concurrency, timeout, retries, backoff: the transport.
        max_tokens, temperature: sampling of the answer (temperature 0: deterministic judges).
        max_off_format: the largest share of unreadable answers a call tolerates.
    """

    def __init__(self, url: str, model: str, *, api_key: str | None, labels: Sequence[str],
                 score_range: Sequence[float], pointwise_question: str, pairwise_question: str,
                 system_prompt: str | None, concurrency: int, timeout: float, retries: int, backoff: float,
                 max_tokens: int, temperature: float, max_off_format: float, bt_scale: float) -> None:
        super().__init__("openai_judge", differentiable=False, batch_size=None, bt_scale=bt_scale, weightless=True)
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.labels = tuple(labels)
        self.low, self.high = (float(v) for v in score_range)
        self.pointwise_question = pointwise_question
        self.pairwise_question = pairwise_question
        self.system_prompt = system_prompt
        self.concurrency = concurrency
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.max_off_format = float(max_off_format)
        self.client = httpx.Client(limits=httpx.Limits(max_connections=concurrency))
        self.lock = threading.Lock()
        self.answers = 0
        self.off_format = 0

    def extra_repr(self) -> str:
        return f"url={self.url!r}, model={self.model!r}, concurrency={self.concurrency}"

    # ------------------------------------------------------------------ requests
    def messages(self, question: str, images: list[str], captions: Sequence[str | None]) -> list[dict[str, Any]]:
        """The chat messages: optional system prompt, then each image (after its caption) and the question."""
        content: list[dict[str, Any]] = []
        for caption, image in zip(captions, images):
            if caption:
                content.append({"type": "text", "text": caption})
            content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}})
        content.append({"type": "text", "text": question})
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": content}]

    def ask(self, messages: list[dict[str, Any]]) -> str:
        """One chat completion; returns the answer text."""
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        answer = request_with_retries(
            "POST", self.url + "/chat/completions", retries=self.retries, backoff=self.backoff, timeout=self.timeout,
            what="reward 'openai_judge'", hint="is the judge's server (vLLM, SGLang, TGI, ...) running there?",
            client=self.client, json=body, headers=self.headers)
        try:
            return str(answer["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as error:
            raise UserError(f"reward 'openai_judge': {self.url} answered without choices[0].message.content "
                            f"({str(answer)[:120]!r}); is it an OpenAI-compatible chat endpoint?") from error

    def ask_all(self, conversations: list[list[dict[str, Any]]]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.ask, conversations))

    # ------------------------------------------------------------------ parsing
    def read_score(self, answer: str) -> float | None:
        """The first number of the answer on [0, 1], or None if there is none."""
        match = _NUMBER.search(answer)
        if match is None:
            return None
        value = min(max(float(match.group()), self.low), self.high)
        return (value - self.low) / (self.high - self.low)

    def read_choice(self, answer: str) -> float | None:
        """1.0 if the answer names the first label, 0.0 the second, None if neither (or both) stand alone."""
        found = {label for label in self.labels if re.search(rf"(?<![A-Za-z0-9]){re.escape(label)}(?![A-Za-z0-9])", answer)}
        if len(found) != 1:
            return None
        return 1.0 if found == {self.labels[0]} else 0.0

    def tally(self, answers: list[str], values: list[float | None], what: str) -> list[float]:
        """Count unreadable answers (as ties), warn once per call, raise past ``max_off_format``."""
        bad = [a for a, v in zip(answers, values) if v is None]
        with self.lock:
            self.answers += len(answers)
            self.off_format += len(bad)
        if bad:
            share = len(bad) / len(answers)
            message = (f"{len(bad)} of {len(answers)} {what} answers were off-format (counted as ties), "
                       f"e.g. {bad[0][:80]!r}")
            if share > self.max_off_format:
                raise UserError(f"reward 'openai_judge': {message}; above max_off_format={self.max_off_format:g}: "
                                "check the model name, pointwise_question/pairwise_question and score_range/labels")
            log.warning("openai_judge: %s (%d of %d answers off-format so far)", message, self.off_format, self.answers)
        return [0.5 if v is None else v for v in values]

    # ------------------------------------------------------------------ the reward
    def forward(self, images: torch.Tensor, prompts: list[str], grad: bool | None = None) -> torch.Tensor:
        """Pointwise score on [0, 1]. images: [B, 3, H, W] in [0, 1]; returns [B] float32 on the images' device."""
        check_images(images, prompts, self.name)
        self.wants_grad(grad, images)
        encoded = _png_base64(images)
        low, high = f"{self.low:g}", f"{self.high:g}"
        conversations = [self.messages(self.pointwise_question.format(prompt=p, low=low, high=high), [img], [None])
                         for p, img in zip(prompts, encoded)]
        answers = self.ask_all(conversations)
        values = self.tally(answers, [self.read_score(a) for a in answers], "pointwise")
        return torch.tensor(values, dtype=torch.float32, device=images.device)

    def compare(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str],
                grad: bool | None = None) -> torch.Tensor:
        """P(images_a[i] preferred), averaged over both presentation orders. -> [B] in [0, 1]."""
        check_pair(images_a, images_b, prompts, self.name)
        self.wants_grad(grad, images_a, images_b)
        a, b = _png_base64(images_a), _png_base64(images_b)
        first, second = self.labels
        captions = (f"Image {first}:", f"Image {second}:")
        conversations = []
        for prompt, image_a, image_b in zip(prompts, a, b):
            question = self.pairwise_question.format(prompt=prompt, first=first, second=second)
            conversations.append(self.messages(question, [image_a, image_b], captions))
            conversations.append(self.messages(question, [image_b, image_a], captions))
        answers = self.ask_all(conversations)
        values = self.tally(answers, [self.read_choice(x) for x in answers], "pairwise")
        ordered, swapped = torch.tensor(values[0::2]), torch.tensor(values[1::2])
        return (0.5 * (ordered + (1.0 - swapped))).float().to(images_a.device)


def _png_base64(images: torch.Tensor) -> list[str]:
    from PIL import Image

    out = []
    for array in _to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


@register_reward("openai_judge", differentiable=False, weights="none here: the judge runs behind its endpoint")
def build_openai_judge(url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                       labels: Sequence[str] = ("A", "B"), score_range: Sequence[float] = (0, 10),
                       pointwise_question: str = POINTWISE_QUESTION, pairwise_question: str = PAIRWISE_QUESTION,
                       system_prompt: str | None = None, concurrency: int = 8, timeout: float = 60.0, retries: int = 3,
                       backoff: float = 1.0, max_tokens: int = 16, temperature: float = 0.0,
                       max_off_format: float = 0.5, bt_scale: float = 1.0) -> Reward:
    """A judge at an OpenAI-compatible endpoint ``url`` (the API base, ending in /v1) serving ``model``.

    ``api_key_env`` names the environment variable holding the key (unset or empty: no key sent)."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise UserError(f"reward 'openai_judge': url must be the API base, e.g. http://127.0.0.1:8000/v1, got {url!r}")
    if isinstance(labels, str) or len(labels) != 2 or labels[0] == labels[1]:
        raise UserError(f"reward 'openai_judge': labels must be two different strings, got {labels!r}")
    if isinstance(score_range, str) or len(score_range) != 2 or float(score_range[0]) >= float(score_range[1]):
        raise UserError(f"reward 'openai_judge': score_range must be [low, high] with low < high, got {score_range!r}")
    if not isinstance(concurrency, int) or concurrency < 1:
        raise UserError(f"reward 'openai_judge': concurrency must be a positive integer, got {concurrency!r}")
    if not 0 <= float(max_off_format) <= 1:
        raise UserError(f"reward 'openai_judge': max_off_format must be in [0, 1], got {max_off_format!r}")
    for option, template, fields in (("pointwise_question", pointwise_question, {"prompt": "", "low": 0, "high": 1}),
                                     ("pairwise_question", pairwise_question, {"prompt": "", "first": "A", "second": "B"})):
        try:
            template.format(**fields)
        except (KeyError, IndexError, ValueError) as error:
            raise UserError(f"reward 'openai_judge': {option} has a bad placeholder ({error}); allowed: "
                            f"{', '.join('{' + k + '}' for k in fields)}") from error
    api_key = os.environ.get(api_key_env) if api_key_env else None
    return OpenAIJudge(url, model, api_key=api_key, labels=labels, score_range=score_range,
                       pointwise_question=pointwise_question, pairwise_question=pairwise_question,
                       system_prompt=system_prompt, concurrency=concurrency, timeout=timeout, retries=retries,
                       backoff=backoff, max_tokens=max_tokens, temperature=temperature,
                       max_off_format=max_off_format, bt_scale=bt_scale)
