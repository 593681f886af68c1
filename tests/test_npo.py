"""NPO at inference: a negative LoRA in the unconditional branch of a stock diffusers pipeline.

The reference for every comparison is written by hand: two separate stock pipelines (the positive
model, and a second one with the negative LoRA loaded by diffusers' own ``load_lora_weights``) and
the guidance formula eps = eps_neg(x, t, c_uncond) + w (eps_pos(x, t, c) - eps_neg(x, t, c_uncond))
stepped through the family's scheduler maths.
"""

from __future__ import annotations

import pytest
import torch

from diffalign import lora
from diffalign.config import LoraSettings
from diffalign.errors import UserError
from diffalign.pipelines.loading import load_pipeline, policy_for
from diffalign.pipelines.npo import apply_npo_to_pipeline, disable_npo, enable_npo, is_npo_enabled

FAMILIES = {"tiny-sd": "sd", "tiny-sdxl": "sdxl", "tiny-flux": "flux"}
SIZE = 32  # pixels; latents 16x16 (SD/SDXL) or 8x8 (FLUX)
STEPS = 3
GUIDANCE = 4.0


def _denoiser(pipe):
    return pipe.transformer if lora.family_of_pipeline(pipe) == "flux" else pipe.unet


def _write_lora(name: str, folder, perturb: float, seed: int, negative: bool = True, method: str = "self_npo"):
    """A LoRA for ``name`` saved by diffalign; perturb=0 keeps peft's zero-initialised B."""
    donor = load_pipeline(name)
    family = FAMILIES[name]
    params = lora.add_lora(_denoiser(donor), family, LoraSettings(rank=4, alpha=8))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator) * perturb)
    extra = {"negative": "true"} if negative else None
    return lora.save_lora(donor, _denoiser(donor), folder, family=family, extra_metadata=extra, method=method)


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """Per model: a zero-initialised negative LoRA, a 'trained' (non-zero) one, and a positive one."""
    root = tmp_path_factory.mktemp("npo-loras")
    out = {}
    for name in FAMILIES:
        out[name] = {
            "zero": _write_lora(name, root / f"{name}-zero", 0.0, 0),
            "trained": _write_lora(name, root / f"{name}-neg", 0.3, 1),
            "positive": _write_lora(name, root / f"{name}-pos", 0.3, 2, negative=False, method="diffusion_dpo"),
        }
    return out


def _latents(pipe, seed: int = 0) -> torch.Tensor:
    policy = policy_for(pipe, resolution=SIZE)
    return torch.randn((1, *policy.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(seed))


def _pipeline_latents(pipe, latents: torch.Tensor, guidance: float = GUIDANCE) -> torch.Tensor:
    """The stock pipeline's final latents [1, C, h, w] from ``latents`` (unpacked for FLUX)."""
    kwargs = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent")
    if lora.family_of_pipeline(pipe) == "flux":
        b, c, h, w = latents.shape
        packed = pipe._pack_latents(latents, b, c, h, w)
        out = pipe("a red cube", negative_prompt="", true_cfg_scale=guidance, guidance_scale=3.5,
                   max_sequence_length=32, latents=packed, **kwargs).images
        return pipe._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)
    return pipe("a red cube", guidance_scale=guidance, latents=latents.clone(), **kwargs).images


def _hand_written_npo(positive_pipe, negative_pipe, latents: torch.Tensor, guidance: float = GUIDANCE) -> torch.Tensor:
    """Two models, guided by hand: eps_neg(uncond) + w (eps_pos(cond) - eps_neg(uncond))."""
    options = {"max_sequence_length": 32} if lora.family_of_pipeline(positive_pipe) == "flux" else {}
    positive = policy_for(positive_pipe, resolution=SIZE, **options)
    negative = policy_for(negative_pipe, resolution=SIZE, **options)
    cond = positive.encode_prompts(["a red cube"], with_uncond=True)
    timesteps, next_timesteps = positive.schedule(STEPS, SIZE, SIZE)
    x = latents.float()
    with torch.no_grad():
        for t, t_next in zip(timesteps, next_timesteps):
            eps_pos = positive.predict(x, t, cond)
            eps_neg = negative.predict(x, t, cond.uncond)
            eps = eps_neg + guidance * (eps_pos - eps_neg)
            x = positive.step(eps, x, t, t_next, 0.0, timesteps)[0]
    return x


@pytest.mark.parametrize("name", list(FAMILIES))
def test_zero_initialised_negative_lora_gives_the_stock_output_and_disable_restores_it(name, lora_dirs):
    pipe = load_pipeline(name)
    denoiser = _denoiser(pipe)
    keys_before = list(denoiser.state_dict())
    latents = _latents(pipe)
    stock = _pipeline_latents(pipe, latents)

    enable_npo(pipe, lora_dirs[name]["zero"])
    assert is_npo_enabled(pipe)
    with_npo = _pipeline_latents(pipe, latents)
    if FAMILIES[name] == "flux":
        # True CFG already runs the negative pass alone: the zero LoRA adds exact zeros.
        assert torch.equal(with_npo, stock)
    else:
        # The [uncond, cond] batch runs as two half-batch calls: equal up to float summation order.
        torch.testing.assert_close(with_npo, stock, rtol=1e-4, atol=1e-4)

    disable_npo(pipe)
    assert not is_npo_enabled(pipe)
    assert "forward" not in denoiser.__dict__ and "cache_context" not in denoiser.__dict__
    assert "progress_bar" not in pipe.__dict__
    assert not hasattr(denoiser, "peft_config") and not getattr(denoiser, "_hf_peft_config_loaded", False)
    assert list(denoiser.state_dict()) == keys_before  # the peft layers are gone again
    assert torch.equal(_pipeline_latents(pipe, latents), stock)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trained_negative_lora_equals_a_hand_written_two_model_guidance_loop(name, lora_dirs):
    pipe = load_pipeline(name)
    negative_model = load_pipeline(name)
    negative_model.load_lora_weights(lora_dirs[name]["trained"])  # stock diffusers loader
    latents = _latents(pipe, seed=3)
    stock = _pipeline_latents(pipe, latents)

    enable_npo(pipe, lora_dirs[name]["trained"])
    with_npo = _pipeline_latents(pipe, latents)
    expected = _hand_written_npo(pipe, negative_model, latents)
    assert (with_npo - stock).abs().max() > 1e-2  # the negative model changes the sample
    assert torch.equal(with_npo, expected)  # same calls, same shapes: bit for bit

    # A direct call of the denoiser outside the pipeline's denoising loop is never split or rerouted.
    if FAMILIES[name] != "flux":
        x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
        embeds = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        extra = {}
        if FAMILIES[name] == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(2, 32), "time_ids": torch.zeros(2, 6)}
        with torch.no_grad():
            direct = pipe.unet(x, t, encoder_hidden_states=embeds, **extra).sample
            base = load_pipeline(name).unet(x, t, encoder_hidden_states=embeds, **extra).sample
        assert torch.equal(direct, base)

    disable_npo(pipe)
    assert torch.equal(_pipeline_latents(pipe, latents), stock)


def test_positive_lora_guides_the_conditional_branch_and_carries_the_negative_one(lora_dirs):
    """Base + positive LoRA in the conditional branch, base + positive + negative in the other;
    disable_npo leaves the positive LoRA active with its flags as they were."""
    name = "tiny-sd"
    pipe = load_pipeline(name)
    pipe.load_lora_weights(lora_dirs[name]["positive"], adapter_name="pos")
    negative_model = load_pipeline(name)
    negative_model.load_lora_weights(lora_dirs[name]["positive"], adapter_name="pos")
    negative_model.load_lora_weights(lora_dirs[name]["trained"], adapter_name="neg")
    negative_model.set_adapters(["pos", "neg"], [1.0, 1.0])
    latents = _latents(pipe, seed=4)
    stock = _pipeline_latents(pipe, latents)
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}

    enable_npo(pipe, lora_dirs[name]["trained"])
    assert pipe.unet.active_adapters() == ["pos"]  # between calls the negative adapter is inactive
    torch.testing.assert_close(
        _pipeline_latents(pipe, latents), _hand_written_npo(pipe, negative_model, latents), rtol=1e-5, atol=1e-5
    )
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters() if "npo_negative" not in n} == flags

    disable_npo(pipe)
    assert pipe.unet.active_adapters() == ["pos"] and list(pipe.unet.peft_config) == ["pos"]
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags
    assert torch.equal(_pipeline_latents(pipe, latents), stock)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_merge_weight_scales_the_positive_lora_in_the_negative_branch(lora_dirs, beta):
    """The Diffusion-NPO authors' merge weight (G-U-N/Diffusion-NPO): the negative model is
    base + delta + (1 - beta)(positive - base). By hand: a second pipeline with the positive LoRA
    at strength 1 - beta and the negative one at 1 (diffusers' own set_adapters); the positive
    branch keeps the full positive LoRA, and after the call its scale is back to 1."""
    name = "tiny-sd"
    pipe = load_pipeline(name)
    pipe.load_lora_weights(lora_dirs[name]["positive"], adapter_name="pos")
    negative_model = load_pipeline(name)
    negative_model.load_lora_weights(lora_dirs[name]["positive"], adapter_name="pos")
    negative_model.load_lora_weights(lora_dirs[name]["trained"], adapter_name="neg")
    negative_model.set_adapters(["pos", "neg"], [1.0 - beta, 1.0])
    latents = _latents(pipe, seed=5)
    stock = _pipeline_latents(pipe, latents)

    enable_npo(pipe, lora_dirs[name]["trained"], merge_weight=beta)
    torch.testing.assert_close(
        _pipeline_latents(pipe, latents), _hand_written_npo(pipe, negative_model, latents), rtol=1e-5, atol=1e-5
    )
    disable_npo(pipe)
    assert torch.equal(_pipeline_latents(pipe, latents), stock)  # the positive LoRA at full strength again
    with pytest.raises(ValueError, match=r"merge_weight must be in \[0, 1\], got 1.5"):
        enable_npo(pipe, lora_dirs[name]["trained"], merge_weight=1.5)


def test_negative_lora_scale_zero_and_no_cfg_leave_the_pipeline_unchanged(lora_dirs):
    name = "tiny-sdxl"
    pipe = load_pipeline(name)
    latents = _latents(pipe, seed=5)
    stock_no_cfg = _pipeline_latents(pipe, latents, guidance=1.0)
    stock = _pipeline_latents(pipe, latents)
    enable_npo(pipe, lora_dirs[name]["trained"], scale=0.0)
    torch.testing.assert_close(_pipeline_latents(pipe, latents), stock, rtol=1e-4, atol=1e-4)
    disable_npo(pipe)
    enable_npo(pipe, lora_dirs[name]["trained"], scale=1.0)
    # guidance_scale 1: the pipeline never runs an unconditional branch, NPO has nothing to replace
    with pytest.warns(UserWarning, match="no unconditional branch.*guidance_scale > 1"):
        assert torch.equal(_pipeline_latents(pipe, latents, guidance=1.0), stock_no_cfg)
    with pytest.raises(ValueError, match="already enabled"):
        enable_npo(pipe, lora_dirs[name]["trained"])
    disable_npo(pipe)
    with pytest.raises(ValueError, match="not enabled"):
        disable_npo(pipe)


def test_apply_npo_to_pipeline_checks_the_lora_before_enabling(lora_dirs, tmp_path):
    pipe = load_pipeline("tiny-sd")
    with pytest.raises(UserError, match=r"--npo .*diffusion_dpo.* is not a negative model; train one with method: self_npo"):
        apply_npo_to_pipeline(pipe, lora_dirs["tiny-sd"]["positive"], 1.0)
    with pytest.raises(UserError, match="trained on a sdxl model but the pipeline is sd"):
        apply_npo_to_pipeline(pipe, lora_dirs["tiny-sdxl"]["trained"], 1.0)
    with pytest.raises(UserError, match="no such file or folder"):
        apply_npo_to_pipeline(pipe, tmp_path / "missing", 1.0)
    assert not is_npo_enabled(pipe)
    apply_npo_to_pipeline(pipe, lora_dirs["tiny-sd"]["trained"], 0.5)
    assert is_npo_enabled(pipe)
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling["npo_negative"] == pytest.approx(0.5 * 8 / 4)  # scale * alpha / rank


@pytest.mark.parametrize("family, beta", [("sd15", 1000.0), ("sdxl", 4000.0)])
def test_npo_recipes_are_diffusion_dpo_with_preferences_reversed(family, beta):
    """The authors' beta_dpo (500 SD1.5, 2000 SDXL) has no 0.5 factor: 2x here."""
    from pathlib import Path

    from diffalign.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "npo" / f"{family}.yaml"
    assert path.read_text().startswith("# Diffusion-NPO")
    cfg = load_config(path)
    assert cfg.method == "diffusion_dpo" and cfg.dpo.negative and cfg.dpo.loss == "sigmoid"
    assert cfg.dpo.beta == beta and cfg.lora.rank == 8 and cfg.train.learning_rate == 5e-6
    assert cfg.data.source == "yuvalkirstain/pickapic_v1"


# --- NPO training: Diffusion-DPO with the preference reversed -------------------------------------


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl", "tiny-flux"])
def test_npo_dpo_equals_dpo_with_swapped_pairs(model):
    """dpo.negative on (w, l) is plain Diffusion-DPO on (l, w): same loss, same LoRA gradients
    (and not the loss of DPO on (w, l))."""
    from diffalign.config import load_config
    from diffalign.data import PairBatch
    from diffalign.pipelines.loading import load_policy
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    options = {"max_sequence_length": 32} if model == "tiny-flux" else {}
    policy = load_policy(model, resolution=SIZE, **options)
    params = lora.add_lora(policy.denoiser, policy.family, LoraSettings(rank=4, alpha=4))
    with torch.no_grad():  # a LoRA away from zero, so policy and reference differ
        generator = torch.Generator().manual_seed(0)
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    generator = torch.Generator().manual_seed(1)
    chosen, rejected = torch.rand(2, 3, SIZE, SIZE, generator=generator) * 2 - 1, torch.rand(2, 3, SIZE, SIZE, generator=generator) * 2 - 1
    sizes, crops = [(40, 32), (32, 48), (64, 64), (32, 32)], [(0, 0), (0, 8), (16, 16), (0, 0)]
    batch = PairBatch(["a red cube", "a cat"], chosen, rejected, sizes, crops)
    swapped = PairBatch(["a red cube", "a cat"], rejected, chosen, sizes[2:] + sizes[:2], crops[2:] + crops[:2])

    def run(negative: bool, pairs: PairBatch):
        cfg = load_config({"method": "diffusion_dpo", "model": model, "data": {"source": "builtin:brightness"},
                           "dpo": {"negative": negative, "beta": 500.0}})
        loss, metrics = DiffusionDPOTrainer(cfg).dpo_step(policy, pairs, torch.Generator().manual_seed(7))
        loss.backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return loss.detach(), metrics, grads

    npo_loss, npo_metrics, npo_grads = run(True, batch)
    dpo_loss, dpo_metrics, dpo_grads = run(False, swapped)
    forward_loss, _, _ = run(False, batch)
    assert torch.equal(npo_loss, dpo_loss) and npo_metrics == dpo_metrics
    assert all(torch.equal(a, b) for a, b in zip(npo_grads, dpo_grads))
    assert any(g.abs().sum() > 0 for g in npo_grads)
    assert abs(npo_loss.item() - forward_loss.item()) > 1e-3


def test_a_negative_dpo_run_writes_a_lora_marked_negative_that_generate_npo_accepts(tmp_path):
    from diffalign.config import load_config
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    cfg = load_config({
        "method": "diffusion_dpo", "model": "tiny-sd", "output_dir": str(tmp_path / "run"),
        "data": {"source": "builtin:brightness"}, "dpo": {"negative": True},
        "train": {"max_steps": 1, "batch_size": 1, "resolution": SIZE, "checkpoint_every": 0},
    })
    final = DiffusionDPOTrainer(cfg).train()
    metadata = lora.read_lora_metadata(final)
    assert metadata["negative"] == "true" and metadata["method"] == "diffusion_dpo"
    pipe = load_pipeline("tiny-sd")
    apply_npo_to_pipeline(pipe, final, 1.0)
    assert is_npo_enabled(pipe) and "npo_negative" in pipe.unet.peft_config


@pytest.mark.parametrize("disabled", [False, True])
def test_branch_switch_fast_path_equals_peft_public_calls(lora_dirs, disabled):
    """Writing peft's active-adapter attributes gives the same negative branch as set_adapter /
    enable_adapters, and both restore the layers (and requires_grad flags) exactly, also when
    the positive adapters are disabled (then the negative branch is base + negative)."""
    from diffalign.pipelines.npo import _STATE_ATTR, _negative_branch

    pipe = load_pipeline("tiny-sd")
    pipe.load_lora_weights(lora_dirs["tiny-sd"]["positive"], adapter_name="pos")
    enable_npo(pipe, lora_dirs["tiny-sd"]["trained"])
    if disabled:
        pipe.unet.disable_lora()
    state = getattr(pipe.unet, _STATE_ATTR)
    before = [(list(layer.active_adapters), layer.disable_adapters) for layer in state.layers]
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    outputs = []
    with torch.no_grad():
        plain = pipe.unet(x, 10, encoder_hidden_states=embeds).sample
        for fast in (True, False):
            with _negative_branch(state, fast_path=fast):
                outputs.append(pipe.unet(x, 10, encoder_hidden_states=embeds).sample)
            assert [(list(layer.active_adapters), layer.disable_adapters) for layer in state.layers] == before
            assert [p.requires_grad for p in pipe.unet.parameters()] == flags
    assert torch.equal(outputs[0], outputs[1]) and not torch.allclose(outputs[0], plain)
    reference = load_pipeline("tiny-sd")
    if not disabled:
        reference.load_lora_weights(lora_dirs["tiny-sd"]["positive"], adapter_name="pos")
    reference.load_lora_weights(lora_dirs["tiny-sd"]["trained"], adapter_name="neg")
    reference.set_adapters(["neg"] if disabled else ["pos", "neg"])
    with torch.no_grad():
        assert torch.equal(outputs[0], reference.unet(x, 10, encoder_hidden_states=embeds).sample)


def test_flux_without_true_cfg_warns_that_npo_is_unused(lora_dirs):
    pipe = load_pipeline("tiny-flux")
    latents = _latents(pipe)
    stock = _pipeline_latents(pipe, latents, guidance=1.0)  # true_cfg_scale 1: no negative pass
    enable_npo(pipe, lora_dirs["tiny-flux"]["trained"])
    with pytest.warns(UserWarning, match="true_cfg_scale > 1 and a negative_prompt"):
        assert torch.equal(_pipeline_latents(pipe, latents, guidance=1.0), stock)


def test_negative_dpo_lora_samples_darker_images(tmp_path):
    """The direction on sampled images: a negative LoRA trained by Diffusion-DPO with the
    preference reversed (dpo.negative) on brighter-wins pairs makes its own 4-step samples darker
    than the base's (tiny-flux, 30 steps; measured 0.5327 -> 0.5255), so as the unconditional
    branch of NPO guidance it pushes samples the other way. (The random-weight SD/SDXL UNets
    cannot show brightness directions reliably; see test_dpo's sampled-images test.)"""
    from sampled_direction import sampled_reward

    from diffalign.config import load_config
    from diffalign.trainers.diffusion_dpo import DiffusionDPOTrainer

    cfg = load_config({
        "method": "diffusion_dpo", "model": "tiny-flux", "output_dir": str(tmp_path / "npo"), "seed": 0,
        "lora": {"rank": 8, "alpha": 16},
        "train": {"max_steps": 30, "learning_rate": 1e-3, "batch_size": 4, "checkpoint_every": 0, "warmup_steps": 3},
        "dpo": {"beta": 500.0, "negative": True}, "data": {"source": "builtin:brightness", "num_workers": 0},
        "logging": {"sample_every": 0},
    })
    trainer = DiffusionDPOTrainer(cfg)
    trainer.train()
    base, tuned = sampled_reward(trainer.policy)
    assert tuned < base - 3e-3, (base, tuned)
