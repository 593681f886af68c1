"""Kohya-format export: a stock diffusers pipeline (a real consumer of kohya files) loads the
exported file and draws the same image as with the diffusers-format LoRA, per family; FLUX's
fused BFL layers carry exactly the parts' updates; metadata, NPO marker, merge, no overwrite."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch

from diffalign import kohya
from diffalign.cli import main
from diffalign.config import LoraSettings
from diffalign.errors import UserError
from diffalign.export import export_kohya, export_merged
from diffalign.lora import DEFAULT_TARGET_MODULES, add_lora, lora_parameters, save_lora

TINY = {"sd": "tiny-sd", "sdxl": "tiny-sdxl", "flux": "tiny-flux", "sd3": "tiny-sd3"}
# diffusers' kohya FLUX converter hard-codes FLUX.1's widths (3072 / 12288) for the single
# blocks' fused linear1, so a stock load of the tiny FLUX gets a LoRA on its double block only;
# the single blocks are checked against the layer maths in test_flux_fused_layers_carry_each_part.
FLUX_DOUBLE_BLOCK = [f"transformer_blocks.0.{name}" for name in kohya._FLUX_DOUBLE if name != "norm1.linear"
                     and name != "norm1_context.linear"]  # fmt: skip


def generate(pipe, family: str) -> torch.Tensor:
    """4 steps at 64 px, seed 0 -> [1, 3, 64, 64] in [0, 1]."""
    kwargs = {"max_sequence_length": 32} if family in ("flux", "sd3") else {}
    with torch.no_grad():
        return pipe("a red cube on a table", num_inference_steps=4, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images


def trained_run(tiny_pipe, tmp_path, family: str, targets=None, negative: bool = False):
    """A run folder (config.yaml naming the model, final/ LoRA with rank 4, alpha 8) and its pipeline."""
    pipe = tiny_pipe(TINY[family])
    denoiser = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    add_lora(denoiser, family, LoraSettings(rank=4, alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in lora_parameters(denoiser).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"method: diffusion_dpo\nmodel: {TINY[family]}\n")
    save_lora(pipe, denoiser, run / "final", family=family, method="diffusion_dpo",
              extra_metadata={"negative": "true"} if negative else None)
    return run, pipe, denoiser


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_stock_pipeline_loads_kohya_export_like_the_diffusers_lora(family, tiny_pipe, tmp_path):
    run, pipe, _ = trained_run(tiny_pipe, tmp_path, family, FLUX_DOUBLE_BLOCK if family == "flux" else None)
    base = generate(tiny_pipe(TINY[family]), family)
    with_diffusers_lora = tiny_pipe(TINY[family])
    with_diffusers_lora.load_lora_weights(run / "final")
    expected = generate(with_diffusers_lora, family)
    assert (expected - generate(pipe, family)).abs().max() < 1e-5  # the diffusers-format file itself is right
    assert (expected - base).abs().max() > 4 / 255  # the LoRA changes the image, so the check can fail

    out = export_kohya(run / "final", tmp_path / "model.safetensors")
    with safetensors.safe_open(str(out), framework="pt") as f:
        keys, header = list(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                        for k in keys)  # fmt: skip
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "8.0")
    assert header["ss_base_model_version"] == kohya.BASE_MODEL_VERSION[family]
    assert json.loads(header["diffalign"])["family"] == family
    if family == "sd":
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in alphas
    if family == "sdxl":  # sgm names: diffusers' down_blocks.1.attentions.0 is input_blocks.3.1 (1 layer per block)
        assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha" in alphas
        assert any("output_blocks_" in k for k in keys) and any("middle_block_1_" in k for k in keys)
    if family == "flux":  # q, k, v fused into BFL's qkv: rank 3 x 4, alpha 3 x 8
        assert alphas["lora_unet_double_blocks_0_img_attn_qkv.alpha"] == 24.0
        assert alphas["lora_unet_double_blocks_0_img_attn_proj.alpha"] == 8.0
    assert set(alphas.values()) <= {8.0, 24.0}

    with_kohya = tiny_pipe(TINY[family])
    with_kohya.load_lora_weights(str(out))  # diffusers converts the kohya names itself
    assert (generate(with_kohya, family) - expected).abs().max() <= 2 / 255


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux", "sd3"])
def test_kohya_file_applied_as_comfyui_does_draws_the_lora_image(family, tiny_pipe, tmp_path):
    """ComfyUI patches each named weight with up @ down * alpha / rank (rows of a fused layer go to
    its parts); done here on a fresh pipeline with the default targets (FLUX's single blocks and
    SD3 included), the image matches the diffusers-format LoRA's. (diffusers' SD3 loader reads no
    kohya files, and its FLUX converter assumes full-size widths, so this is the check for those.)"""
    run, pipe, _ = trained_run(tiny_pipe, tmp_path, family)
    expected = generate(pipe, family)
    state = safetensors.torch.load_file(str(export_kohya(run / "final", tmp_path / "k.safetensors")))
    fresh = tiny_pipe(TINY[family])
    denoiser = fresh.unet if family in ("sd", "sdxl") else fresh.transformer
    modules = dict(denoiser.named_modules())
    layout = kohya.kohya_layout(denoiser, family)
    assert (generate(fresh, family) - expected).abs().max() > 4 / 255
    with torch.no_grad():
        for key in [k for k in state if k.endswith(".lora_down.weight")]:
            layer = key[: -len(".lora_down.weight")]
            down, up = state[key].flatten(1), state[layer + ".lora_up.weight"].flatten(1)
            delta = up @ down * state[layer + ".alpha"] / down.shape[0]
            for rows, (name, _) in zip(delta.split([w for _, w in layout[layer]]), layout[layer]):
                modules[name].weight += rows.reshape(modules[name].weight.shape)
    assert (generate(fresh, family) - expected).abs().max() <= 2 / 255


def test_flux_fused_layers_carry_each_part(tiny_pipe, tmp_path):
    """ComfyUI adds up @ down * alpha / rank to BFL's fused weight: for single_blocks.0.linear1 that
    must be [dq; dk; dv; 0] (proj_mlp untrained) with d = B A * 8/4; reading the file back splits it."""
    run, _, denoiser = trained_run(tiny_pipe, tmp_path, "flux")
    out = export_kohya(run / "final", tmp_path / "flux.safetensors")
    state = safetensors.torch.load_file(str(out))
    params = lora_parameters(denoiser)

    def delta(module: str) -> torch.Tensor:
        return params[f"{module}.lora_B.weight"] @ params[f"{module}.lora_A.weight"] * 2.0

    layer = "lora_unet_single_blocks_0_linear1"
    down, up, alpha = state[layer + ".lora_down.weight"], state[layer + ".lora_up.weight"], state[layer + ".alpha"]
    assert down.shape == (16, 32) and up.shape == (32 * 3 + 128, 16) and alpha.item() == 32.0
    parts = [delta(f"single_transformer_blocks.0.attn.to_{x}") for x in "qkv"]
    fused = torch.cat([*parts, torch.zeros(128, 32)])
    torch.testing.assert_close(up @ down * alpha / down.shape[0], fused.detach(), rtol=0, atol=1e-6)

    back = kohya.from_kohya(state, kohya.kohya_layout(denoiser, "flux"))
    trained = {key.rsplit(".lora_", 1)[0] for key in params}
    assert set(back) == trained  # every trained module, and no all-zero proj_mlp part
    for module, (a, b, scale) in back.items():
        torch.testing.assert_close(b @ a * scale, delta(module).detach(), rtol=0, atol=1e-6)


def test_npo_marker_kept_and_nothing_overwritten(tiny_pipe, tmp_path):
    run, _, _ = trained_run(tiny_pipe, tmp_path, "sd", negative=True)
    out = tmp_path / "neg.safetensors"
    assert main(["export-lora", str(run / "final"), "--format", "kohya", "--out", str(out)]) == 0
    with safetensors.safe_open(str(out), framework="pt") as f:
        ours = json.loads(f.metadata()["diffalign"])
    assert ours["negative"] == "true" and ours["format"] == "kohya" and ours["method"] == "diffusion_dpo"
    before = out.read_bytes()
    with pytest.raises(UserError, match="exists; give a new path"):
        export_kohya(run / "final", out)
    assert out.read_bytes() == before
    with pytest.raises(UserError, match="one .safetensors file"):
        export_kohya(run / "final", tmp_path / "model.pt")


def test_merge_writes_a_model_that_draws_the_lora_image(tiny_pipe, tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    run, pipe, _ = trained_run(tiny_pipe, tmp_path, "sd")
    expected = generate(pipe, "sd")
    merged = export_merged(run / "final", tmp_path / "merged")
    fresh = DiffusionPipeline.from_pretrained(merged, safety_checker=None, requires_safety_checker=False)
    fresh.set_progress_bar_config(disable=True)
    assert (generate(fresh, "sd") - expected).abs().max() <= 2 / 255

    single = export_merged(run / "final", tmp_path / "unet.safetensors")
    unet = UNet2DConditionModel.from_config(fresh.unet.config)
    unet.load_state_dict(safetensors.torch.load_file(str(single)))
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), fresh.unet.state_dict().values()))
    with pytest.raises(UserError, match="exists"):
        export_merged(run / "final", tmp_path / "merged")


def test_kohya_layout_names_every_default_target_of_full_size_models():
    """On the published SD1.5 / SDXL / FLUX.1-dev denoisers (meta device), each default LoRA target has a
    kohya name, and SDXL's match the sgm UNet's blocks (input_blocks.4.1 is down_blocks.1.attentions.0)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from diffalign.lora import matching_module_names
    from diffalign.pipelines.reference_configs import FLUX_DEV_TRANSFORMER, SD15_UNET, SDXL_BASE_UNET

    for family, build in (("sd", lambda: UNet2DConditionModel(**SD15_UNET)),
                          ("sdxl", lambda: UNet2DConditionModel(**SDXL_BASE_UNET)),
                          ("flux", lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER))):  # fmt: skip
        with torch.device("meta"):
            model = build()
        layout = kohya.kohya_layout(model, family)
        mapped = {name for parts in layout.values() for name, _ in parts}
        targets = {n for t in DEFAULT_TARGET_MODULES[family] for n in matching_module_names(model, t)}
        assert targets <= mapped, sorted(targets - mapped)[:3]
        if family == "sdxl":
            assert layout["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"][0][0] == (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
            assert "lora_unet_output_blocks_5_1_proj_out" in layout and "lora_unet_middle_block_1_proj_in" in layout
        if family == "flux":
            assert [w for _, w in layout["lora_unet_single_blocks_37_linear1"]] == [3072, 3072, 3072, 12288]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_init_lora_reads_a_kohya_file(family, tiny_pipe, tmp_path):
    """init_lora accepts the kohya export (FLUX: its fused BFL layers split back): the continued
    adapter has the trained rank, alpha and weights, and draws the trained image."""
    from diffalign.lora import add_trainable_lora, lora_state_dict

    run, pipe, denoiser = trained_run(tiny_pipe, tmp_path, family)
    expected, trained = generate(pipe, family), lora_state_dict(denoiser)
    out = export_kohya(run / "final", tmp_path / "k.safetensors")
    fresh = tiny_pipe(TINY[family])
    fresh_denoiser = fresh.unet if family == "sdxl" else fresh.transformer
    params = add_trainable_lora(fresh_denoiser, family, LoraSettings(rank=4, alpha=8), init_lora=str(out))
    assert params and all(p.requires_grad for p in params)
    config = fresh_denoiser.peft_config["default"]
    assert (config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern) == (4, 8.0, {}, {})
    continued = lora_state_dict(fresh_denoiser)
    assert continued.keys() == trained.keys()
    assert all(torch.allclose(continued[k], trained[k], atol=1e-7) for k in trained)
    assert (generate(fresh, family) - expected).abs().max() < 1e-4

    with pytest.raises(UserError, match="is a rank-4 LoRA with alpha 8, but lora.rank=8"):
        add_trainable_lora(tiny_pipe(TINY[family]).unet if family == "sdxl" else tiny_pipe(TINY[family]).transformer,
                           family, LoraSettings(rank=8, alpha=8), init_lora=str(out))
    with pytest.raises(UserError, match="is not a layer of this model; was the LoRA trained for another model family"):
        add_trainable_lora(tiny_pipe("tiny-sd").unet, "sd", LoraSettings(rank=4, alpha=8), init_lora=str(out))
