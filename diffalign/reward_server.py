"""``diffalign serve-reward``: any registry reward behind HTTP, batched across clients.

    diffalign serve-reward pickscore --device cuda:1 --port 8700 --max-batch 32 --max-wait-ms 10
    # in the training config:  reward: "remote:url=http://127.0.0.1:8700"

Routes (the wire format is in :mod:`diffalign.rewards.remote`):

* ``POST /score``: images + prompts -> ``{"scores": [...]}``, one per image;
* ``POST /compare``: images, images_b + prompts -> ``{"probabilities": [...]}``, P(images[i] > images_b[i])
  from the reward's own ``compare`` (a pairwise judge's, or Bradley-Terry on its scores);
* ``GET /health``: the reward's name and kind plus load: images queued, batches run, mean batch size.

Batching: every request is cut into pieces of at most ``max_batch`` images; one worker takes the
oldest piece, adds the next pieces of the same kind and image size while the batch has room and
``max_wait_ms`` has not passed since it took the first, scores them in one call and hands each
piece its slice. So eight clients sending 4 images each are scored as one batch of 32, and one
request of 100 images as batches of 32, 32, 32 and 4. Scores do not depend on who shares a batch,
except for a reward that normalises over its batch (``composite`` with ``standardize: batch``).

A malformed request gets a 400 with the reason (the server keeps serving). Ctrl-C or SIGTERM stops
accepting connections, lets the requests in flight finish, then exits.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations at runtime.

import asyncio
import logging
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diffalign.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used, so `diffalign --help` stays fast
    import torch

log = logging.getLogger("diffalign.reward_server")


class InvalidImages(UserError):
    """Images the reward cannot take (shape, dtype, range): answered with 400, like a malformed body."""


@dataclass
class Piece:
    """At most ``max_batch`` images of one request, waiting for the worker."""

    kind: str  # "score" | "compare"
    images: "torch.Tensor"  # [n, 3, H, W] float, or as parsed off the wire until the worker takes it
    prompts: list[str]
    images_b: "torch.Tensor | None"
    future: asyncio.Future = field(repr=False)  # of the event loop that took the request

    def fits_with(self, other: "Piece") -> bool:
        return self.kind == other.kind and self.images.shape[1:] == other.images.shape[1:]

    def resolve(self, values: "list[float] | None", error: "BaseException | None") -> None:
        """Hand this piece its result on its event loop (called from the worker's thread)."""

        def settle() -> None:
            if self.future.done():  # a client that hung up leaves a cancelled future
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(values)

        self.future.get_loop().call_soon_threadsafe(settle)


class Batcher:
    """Scores queued pieces in batches of up to ``max_batch`` images, on one thread.

    The event loop only parses requests (numpy), queues pieces and awaits their futures;
    :meth:`run` (blocking) converts their images to float, checks, batches and scores them, so
    every torch kernel runs on one thread. ``diffalign serve-reward`` runs it on the main thread,
    which loaded the reward, and the
    event loop on another. The reason: each thread that runs a parallel torch kernel keeps its own
    OpenMP team, and once the teams hold more threads than there are cores, libgomp stops spinning
    between kernels and every kernel waits for its threads to wake. The tiny CLIP then scored 32
    images in 35-45 ms instead of 12 on the 2-core CPU, once the event loop had checked one
    request's pixel range with torch. :meth:`start_thread` runs the worker on a thread of its own
    instead (an app served from a test or a notebook).
    """

    def __init__(self, reward: Any, max_batch: int, max_wait_s: float) -> None:
        self.reward = reward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # Piece, or None: the stop sentinel
        self.carry: "Piece | None" = None  # a piece that did not fit the last batch: it starts the next
        self.lock = threading.Lock()  # the counters below change on both threads
        self.queued_images = 0
        self.served_images = 0
        self.batches = 0
        self.thread: "threading.Thread | None" = None

    async def submit(self, kind: str, images: "torch.Tensor", prompts: list[str],
                     images_b: "torch.Tensor | None") -> list[float]:
        """Score one request (any size); returns one float per image, in order."""
        loop = asyncio.get_running_loop()
        pieces = []
        for start in range(0, len(prompts), self.max_batch):
            stop = start + self.max_batch
            pieces.append(Piece(kind, images[start:stop], prompts[start:stop],
                                None if images_b is None else images_b[start:stop], loop.create_future()))
        with self.lock:
            self.queued_images += len(prompts)
        for piece in pieces:
            self.queue.put(piece)
        parts = await asyncio.gather(*(piece.future for piece in pieces))
        return [value for part in parts for value in part]

    def _next(self, timeout: "float | None") -> "Piece | None":
        """The next valid piece (an invalid one is answered with :class:`InvalidImages` and skipped)."""
        if self.carry is not None:
            piece, self.carry = self.carry, None
            return piece
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is None:
                try:  # wake now and then: a signal that the kernel hands another thread runs its Python
                    piece = self.queue.get(timeout=0.2)  # handler only once the main thread wakes
                except queue.Empty:
                    continue
            else:
                piece = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if piece is None or self._valid(piece):
                return piece

    def _valid(self, piece: Piece) -> bool:
        import torch

        from diffalign.rewards.base import check_images, check_shapes
        from diffalign.rewards.remote import wire_to_images

        # 8-bit images are in [0, 1] by construction, so only float ones get the range check (a pass
        # over the pixels; the reward repeats every check when it scores them, this one answers a bad
        # piece alone instead of failing its whole batch)
        check = check_shapes if piece.images.dtype == torch.uint8 else check_images
        piece.images = wire_to_images(piece.images)  # here, on the worker's thread: a torch kernel
        if piece.images_b is not None:
            piece.images_b = wire_to_images(piece.images_b)
        try:
            for images in (piece.images, piece.images_b):
                if images is not None:
                    check(images, piece.prompts, self.reward.name)
        except UserError as error:
            with self.lock:
                self.queued_images -= len(piece.prompts)
            piece.resolve(None, InvalidImages(str(error)))
            return False
        return True

    def run(self) -> None:
        """The worker loop (blocking); ends at the ``None`` sentinel that :meth:`stop` queues."""
        while True:
            first = self._next(None)
            if first is None:
                return
            batch, size = [first], len(first.prompts)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch:
                try:
                    piece = self._next(max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if piece is None:
                    self.queue.put(None)  # keep the sentinel for the outer loop
                    break
                if not piece.fits_with(first) or size + len(piece.prompts) > self.max_batch:
                    self.carry = piece
                    break
                batch.append(piece)
                size += len(piece.prompts)
            self._score(batch, size)

    def _score(self, batch: list[Piece], size: int) -> None:
        with self.lock:
            self.queued_images -= size
        try:
            values = self._compute(batch)
        except Exception as error:  # every piece of the batch gets the error; the worker goes on
            if not isinstance(error, UserError):
                log.exception("reward %s failed on a batch of %d images", getattr(self.reward, "name", "?"), size)
            for piece in batch:
                piece.resolve(None, error)
            return
        with self.lock:
            self.batches += 1
            self.served_images += size
        offset = 0
        for piece in batch:
            n = len(piece.prompts)
            piece.resolve(values[offset : offset + n], None)
            offset += n

    def _compute(self, batch: list[Piece]) -> list[float]:
        import torch

        images = torch.cat([p.images for p in batch])
        prompts = [prompt for p in batch for prompt in p.prompts]
        with torch.no_grad():
            if batch[0].kind == "compare":
                values = self.reward.compare(images, torch.cat([p.images_b for p in batch]), prompts)
            else:
                values = self.reward(images, prompts)
        return values.float().cpu().tolist()

    def start_thread(self) -> None:
        self.thread = threading.Thread(target=self.run, name="reward", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Queue the sentinel: the worker ends once the pieces queued before it are scored."""
        self.queue.put(None)


def create_app(reward: Any, *, max_batch: int = 32, max_wait_ms: float = 5.0, batcher: "Batcher | None" = None):
    """The FastAPI application serving ``reward`` (a built :class:`~diffalign.rewards.Reward`).

    ``batcher``: one whose :meth:`Batcher.run` the caller runs (as :func:`serve` does, on the main
    thread); the app stops it at shutdown. Default: the app makes one and runs it on a thread of its own.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Request

    from diffalign.rewards.remote import PayloadError, parse_request

    if not isinstance(max_batch, int) or max_batch < 1:
        raise UserError(f"--max-batch must be a positive integer, got {max_batch!r}")
    if max_wait_ms < 0:
        raise UserError(f"--max-wait-ms must be >= 0, got {max_wait_ms!r}")
    started = time.time()
    own = batcher is None
    if own:
        batcher = Batcher(reward, max_batch, max_wait_ms / 1000.0)

    @asynccontextmanager
    async def lifespan(app):
        if own:
            batcher.start_thread()
        yield
        batcher.stop()  # after the requests in flight: uvicorn runs this once they are answered
        if own:
            await asyncio.to_thread(batcher.thread.join)

    app = FastAPI(title="diffalign reward server", lifespan=lifespan)

    async def handle(request: Request, kind: str) -> list[float]:
        body = await request.body()
        try:  # numpy only: see Batcher for why this thread runs no torch kernels
            images, prompts, images_b = parse_request(body, request.headers.get("content-type", ""), kind == "compare")
        except PayloadError as error:
            raise HTTPException(status_code=400, detail=str(error)) from error
        try:
            return await batcher.submit(kind, images, prompts, images_b)
        except InvalidImages as error:
            raise HTTPException(status_code=400, detail=str(error)) from error
        except UserError as error:
            raise HTTPException(status_code=422, detail=str(error)) from error
        except Exception as error:
            raise HTTPException(status_code=500, detail=f"{type(error).__name__}: {error}") from error

    @app.post("/score")
    async def score(request: Request) -> dict[str, Any]:
        return {"scores": await handle(request, "score")}

    @app.post("/compare")
    async def compare(request: Request) -> dict[str, Any]:
        return {"probabilities": await handle(request, "compare")}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok", "reward": reward.name, "differentiable": False,
            "pairwise": _is_pairwise(reward),
            "max_batch": max_batch, "max_wait_ms": max_wait_ms, "queued_images": batcher.queued_images,
            "served_images": batcher.served_images, "batches": batcher.batches,
            "mean_batch_size": batcher.served_images / batcher.batches if batcher.batches else 0.0,
            "uptime_s": round(time.time() - started, 3),
        }

    return app


def _is_pairwise(reward: Any) -> bool:
    """Whether ``reward`` judges pairs itself (overrides compare) rather than by Bradley-Terry on scores."""
    from diffalign.rewards.base import Reward

    return type(reward).compare is not Reward.compare


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); a taken port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP (not 0): asyncio then sets TCP_NODELAY on every accepted connection; without
    # it Nagle's algorithm and the client's delayed ACK add ~40 ms to every answer
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host") from error
    sock.listen(128)
    return sock


def serve(reward: Any, host: str = "127.0.0.1", port: int = 8700, *, max_batch: int = 32, max_wait_ms: float = 5.0,
          graceful_timeout_s: float = 30.0, announce=print) -> None:
    """Serve ``reward`` until Ctrl-C / SIGTERM (then finish the requests in flight and return).

    The reward runs on this (the main) thread, the HTTP server's event loop on another.
    """
    import uvicorn

    batcher = Batcher(reward, max_batch, max_wait_ms / 1000.0)
    app = create_app(reward, max_batch=max_batch, max_wait_ms=max_wait_ms, batcher=batcher)
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_timeout_s)
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def http() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as error:  # re-raised on the main thread below
            failure.append(error)
        finally:
            batcher.stop()  # the worker ends even if the server never started

    def on_signal(signum, frame) -> None:  # uvicorn installs its handlers only on the main thread
        if server.should_exit:
            server.force_exit = True  # a second Ctrl-C: stop waiting for the requests in flight
        server.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="http", daemon=True)
    try:
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.01)
        if server.started:
            announce(f"serving reward '{reward.name}' on http://{host}:{bound} (max batch {max_batch}, max wait "
                     f"{max_wait_ms:g} ms); use it as reward: \"remote:url=http://{host}:{bound}\"; Ctrl-C stops",
                     flush=True)
        batcher.run()
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]
    announce("reward server stopped", flush=True)


def add_serve_arguments(parser) -> None:
    """The ``diffalign serve-reward`` options."""
    parser.add_argument("reward", help="registry reward spec, e.g. pickscore or 'clip:model=ViT-B-32'")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8700, help="port (0: a free one, printed at start)")
    parser.add_argument("--max-batch", type=int, default=32, help="most images per reward call (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more requests before it runs (default 5 ms)")
    parser.add_argument("--device", default=None, help="torch device for the reward (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="reward dtype for rewards with weights (e.g. bf16)")


def run_serve(args) -> int:
    """``diffalign serve-reward``: build the reward, then serve it."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise UserError("serve-reward needs the server extra: pip install 'diffalign[serve]'") from error
    import torch

    from diffalign.training import load_frozen_reward

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reward = load_frozen_reward(args.reward, device, args.dtype)
    serve(reward, args.host, args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    return 0
