"""The one reward interface every scorer shares.

A reward maps a batch of images and their prompts to one number per image:

    reward(images: Tensor[B, 3, H, W] in [0, 1], prompts: list[str]) -> Tensor[B] (float32)

and compares two batches with ``compare(images_a, images_b, prompts) -> Tensor[B]``, the probability
that ``images_a[i]`` is preferred to ``images_b[i]``. Pointwise scorers inherit the Bradley-Terry
comparison ``sigmoid(bt_scale * (r_a - r_b))``; pairwise judges (the VLM) override it.

Subclasses implement only ``score_batch`` on one chunk of at most ``batch_size`` images that is
already on the reward's device. ``Reward.forward`` does the rest: input checks, chunking, moving
images, gradient on/off, and the float32 cast.
"""

from __future__ import annotations

import torch

from diffalign.errors import UserError

# Leeway for images that are in [0, 1] up to rounding (e.g. a VAE decode in bf16 before clamping).
_RANGE_TOLERANCE = 1e-3


class Reward(torch.nn.Module):
    """Base class of every scorer in the registry.

    Attributes:
        name: the registry name (``"pickscore"``); used in every error message.
        differentiable: whether gradients w.r.t. the images are meaningful. Calling with images that
            require grad on a non-differentiable reward raises :class:`UserError`.
        batch_size: how many images go through the model at once; ``None`` = all at once.
        bt_scale: the Bradley-Terry temperature of the default ``compare``.
        weightless: rewards without weights (rule-based) compute on the images' device rather than
            on the reward's device.
    """

    def __init__(
        self,
        name: str,
        *,
        differentiable: bool,
        batch_size: int | None = 16,
        bt_scale: float = 1.0,
        weightless: bool = False,
    ) -> None:
        super().__init__()
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise UserError(f"reward '{name}': batch_size must be a positive integer, got {batch_size!r}")
        self.name = name
        self.differentiable = differentiable
        self.batch_size = batch_size
        self.bt_scale = float(bt_scale)
        self.weightless = weightless
        # An empty buffer that follows .to(device), so parameter-free rewards know their device too.
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> "Reward":
        """Rewards are judges: they stay in eval mode (no dropout) even inside a module put in train mode."""
        return super().train(False)

    # ------------------------------------------------------------------ interface for subclasses
    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score one chunk. images: [b, 3, H, W] in [0, 1] on ``self.device``; returns [b].
        Every scorer defines it; a Reward without it cannot score."""
        raise TypeError(f"{type(self).__name__} does not define score_batch, so it cannot score images")

    # ------------------------------------------------------------------ shared machinery
    @property
    def device(self) -> torch.device:
        """The device the reward's weights (and its outputs) live on."""
        return self._device_anchor.device

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}, batch_size={self.batch_size}"

    def forward(self, images: torch.Tensor, prompts: list[str], grad: bool | None = None) -> torch.Tensor:
        """Score ``images`` against ``prompts``.

        Args:
            images: [B, 3, H, W] float in [0, 1], any device.
            prompts: B strings (rule-based rewards ignore them but still check the count).
            grad: ``None`` (default) builds a graph exactly when grad mode is on and ``images``
                require grad; ``True`` forces a graph; ``False`` never builds one.

        Returns:
            [B] float32 on the reward's device (on the images' device for weightless rewards),
            connected to ``images``' graph when a gradient was asked for.
        """
        check_images(images, prompts, self.name)
        want_grad = self.wants_grad(grad, images)
        device = images.device if self.weightless else self.device
        if images.shape[0] == 0:
            return torch.zeros(0, device=device)
        step = self.batch_size or images.shape[0]
        scores = []
        with torch.set_grad_enabled(want_grad):
            for start in range(0, images.shape[0], step):
                chunk = images[start : start + step].to(device)
                chunk_scores = self.score_batch(chunk, list(prompts[start : start + step]))
                if chunk_scores.shape != (chunk.shape[0],):
                    raise RuntimeError(
                        f"reward '{self.name}' returned shape {tuple(chunk_scores.shape)} "
                        f"for {chunk.shape[0]} images; expected ({chunk.shape[0]},)"
                    )
                scores.append(chunk_scores.float())
        return torch.cat(scores)

    def wants_grad(self, grad: bool | None, *images: torch.Tensor) -> bool:
        """Whether to build a graph; raises :class:`UserError` if one is asked of a non-differentiable reward."""
        want = torch.is_grad_enabled() and (any(x.requires_grad for x in images) if grad is None else bool(grad))
        if want and not self.differentiable:
            raise UserError(
                f"reward '{self.name}' is not differentiable; call it under torch.no_grad() "
                f"or with images.detach() (or choose a differentiable reward)"
            )
        return want

    def compare(
        self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str], grad: bool | None = None
    ) -> torch.Tensor:
        """P(images_a[i] is preferred to images_b[i]) as ``sigmoid(bt_scale * (r_a - r_b))``.

        Args:
            images_a, images_b: [B, 3, H, W] in [0, 1].
            prompts: B strings, shared by both images of a pair.

        Returns:
            [B] float32 in [0, 1]; ``compare(a, b) + compare(b, a) == 1``.
        """
        check_pair(images_a, images_b, prompts, self.name)
        if images_a.shape == images_b.shape:
            # One pass over both halves: better batching, and batch-wise statistics (composite
            # standardisation) see both sides of every pair.
            both = self(torch.cat([images_a, images_b]), list(prompts) * 2, grad=grad)
            r_a, r_b = both.chunk(2)
        else:
            r_a, r_b = self(images_a, prompts, grad=grad), self(images_b, prompts, grad=grad)
        return torch.sigmoid(self.bt_scale * (r_a - r_b))


def check_images(images: torch.Tensor, prompts: list[str], name: str) -> None:
    """Raise :class:`UserError` unless images is [B, 3, H, W] float in [0, 1] with B prompts."""
    check_shapes(images, prompts, name)
    if images.numel() > 0:
        low, high = torch.aminmax(images.detach())
        if low.item() < -_RANGE_TOLERANCE or high.item() > 1 + _RANGE_TOLERANCE:
            raise UserError(
                f"reward '{name}': images must be in [0, 1], got values in [{low.item():.3f}, {high.item():.3f}] "
                f"(images in [-1, 1]? pass (images + 1) / 2)"
            )


def check_shapes(images: torch.Tensor, prompts: list[str], name: str) -> None:
    """:func:`check_images` without the range check (a pass over the pixels): type, shape, dtype, prompts."""
    if not isinstance(images, torch.Tensor):
        raise UserError(f"reward '{name}': images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"reward '{name}': images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise UserError(
            f"reward '{name}': images must be floating point in [0, 1], got {images.dtype} "
            f"(convert uint8 images with images.float() / 255)"
        )
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise UserError(f"reward '{name}': got {images.shape[0]} images but {got}; pass one prompt per image")


def check_pair(images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str], name: str) -> None:
    """Raise :class:`UserError` unless both sides are valid batches of the same size."""
    check_images(images_a, prompts, name)
    check_images(images_b, prompts, name)


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor (token ids, processor outputs) to ``device`` without blocking the host.

    A plain ``.to("cuda")`` from pageable memory waits for every kernel already queued, so the CPU could
    not prepare the next chunk while the GPU scores this one; a pinned, non-blocking copy can.
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
