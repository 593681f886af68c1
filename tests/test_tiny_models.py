"""The embedded tiny models: real diffusers classes, offline, deterministic, cached, exportable."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.pipelines.tiny import TINY_MODELS, build_tiny_pipeline, export_tiny, tiny_model_dir

PIPELINE_CLASSES = {"tiny-sd": "StableDiffusionPipeline", "tiny-sdxl": "StableDiffusionXLPipeline", "tiny-flux": "FluxPipeline",
                    "tiny-sd3": "StableDiffusion3Pipeline"}


def _weights(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            out.update({f"{name}.{k}": v for k, v in component.state_dict().items()})
    return out


@pytest.mark.parametrize("name", TINY_MODELS)
def test_build_is_deterministic_and_in_eval_mode(name):
    a, b = build_tiny_pipeline(name), build_tiny_pipeline(name)
    assert type(a).__name__ == PIPELINE_CLASSES[name]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(not m.training for m in a.components.values() if isinstance(m, torch.nn.Module))
    n_params = sum(v.numel() for v in wa.values())
    assert 100_000 < n_params < 3_000_000
    c = build_tiny_pipeline(name, seed=1)
    assert any(not torch.equal(wa[k], _weights(c)[k]) for k in wa)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_cached_model_reloads_exactly_and_generates_repeatably(name, tiny_pipe):
    folder = tiny_model_dir(name)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == PIPELINE_CLASSES[name]
    assert tiny_model_dir(name) == folder  # second call hits the cache
    pipe = tiny_pipe(name)
    built = _weights(build_tiny_pipeline(name))
    loaded = _weights(pipe)
    assert all(torch.equal(built[k], loaded[k]) for k in built)
    kwargs = {"max_sequence_length": 32} if name in ("tiny-flux", "tiny-sd3") else {}
    images = [
        pipe("a red cat", num_inference_steps=2, height=64, width=64, output_type="pt",
             generator=torch.Generator().manual_seed(0), **kwargs).images
        for _ in range(2)
    ]
    assert images[0].shape == (1, 3, 64, 64)
    assert torch.equal(images[0], images[1])


def test_export_tiny_writes_a_standard_diffusers_directory(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = export_tiny("tiny-sdxl", tmp_path / "tiny-sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    with pytest.raises(FileExistsError, match="not empty"):
        export_tiny("tiny-sdxl", out)


def test_unknown_tiny_model_is_rejected():
    with pytest.raises(ValueError, match="tiny-sd, tiny-sdxl, tiny-flux, tiny-sd3"):
        tiny_model_dir("tiny-sd4")
