"""What a diffalign command prints: its own banner, progress bar and summary, not the libraries'.

Unless ``--verbose`` is given, :func:`configure_output` (called by the command line before any
heavy import) turns off the progress bars of diffusers, transformers and huggingface_hub
("Loading pipeline components", "Loading weights", "Writing model shards", downloads), keeps
their loggers at errors only (so, e.g., diffusers' "No LoRA keys associated to CLIPTextModel"
note on every LoRA load is gone), hides deprecation notices meant for library authors, and shows
every other Python warning once. diffalign's own warnings that ask something of the user go
through :func:`warn_once`.
"""

from __future__ import annotations

import os
import sys
import warnings

_quiet = False
_warned: set[str] = set()

# Environment read by the libraries when they are imported.
QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' bars (read at import)
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def configure_output(verbose: bool = False) -> None:
    """Quiet the libraries' output for this process (and the processes it starts), or leave it all
    on with ``verbose``. Call it before diffusers / transformers are imported; libraries imported
    already are quieted too."""
    global _quiet
    _quiet = not verbose
    if verbose:
        return
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("once")
    quiet_libraries()


def quiet_libraries() -> None:
    """Turn off the progress bars and info logs of diffusers / transformers where imported (a
    no-op with ``--verbose`` or outside the command line). diffusers reads no environment for
    its bars, so whatever loads a pipeline calls this after importing it."""
    if not _quiet:
        return
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            logging = __import__(f"{name}.utils.logging", fromlist=["logging"])
            logging.disable_progress_bar()
            logging.set_verbosity_error()
    if "datasets" in sys.modules:  # "Generating train split" when a parquet set is read the first time
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def warn_once(message: str) -> None:
    """Print ``warning: message`` to stderr the first time this message comes up in the process."""
    if message in _warned:
        return
    _warned.add(message)
    print(f"warning: {message}", file=sys.stderr)


def run_summary_lines(out_dir, final, model: str, negative: bool = False, report: bool = True) -> list[str]:
    """The end of a run's summary after the metrics and the final LoRA: the report, and how to
    load the LoRA in stock diffusers (a tiny model is first written out as a diffusers folder)."""
    from pathlib import Path

    lines = []
    if report and (Path(out_dir) / "report.html").is_file():
        lines.append(f"report: {Path(out_dir) / 'report.html'}")
    if negative:
        return lines
    source, dtype = model, ""
    if model.startswith(("tiny-", "shapes-")) and not os.path.isdir(model):
        source = f"./{model}"
        lines.append(f"stock diffusers (after `diffalign export-tiny {model} {source}`):")
        if model.startswith("shapes-"):  # fp16 denoiser and text encoder, fp32 VAE: load them as one dtype
            dtype = ", torch_dtype=torch.float32"
    else:
        lines.append("stock diffusers:")
    lines.append(f'  pipe = DiffusionPipeline.from_pretrained("{source}"{dtype}); pipe.load_lora_weights("{final}")')
    return lines
