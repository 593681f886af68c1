"""The shapes-world models: the build runs for every family (the same code as a full build), the
shipped weights match their manifests, and stock diffusers loads them with no diffalign import."""

import json
import subprocess
import sys

import pytest
import torch

from diffalign.pipelines.loading import (SHAPES_MODELS, SHAPES_ROOT, load_policy, pipeline_call_defaults,
                                        resolve_model_path, shapes_model_name)
from diffalign.world import MANIFEST, WorldBuildConfig, build, content_hash, sample_world, world_policy
from diffalign.world_models import WORDS, build_untrained, clip_word_tokenizer, t5_word_tokenizer

SHIPPED = [name for name in SHAPES_MODELS if (SHAPES_ROOT / name / "model_index.json").is_file()]


def test_every_grammar_word_is_one_token(tmp_path):
    clip, t5 = clip_word_tokenizer(tmp_path), t5_word_tokenizer()
    for word in WORDS:
        assert clip.tokenize(word) == [word + "</w>"]
        assert t5.tokenize(word) == ["\u2581" + word]
    assert clip("a red circle left of a square").input_ids[:8] == (
        [clip.bos_token_id] + [clip.convert_tokens_to_ids(w + "</w>") for w in "a red circle left of a square".split()])


@pytest.mark.parametrize("family, channels, downsample", [("sd", 4, 4), ("sdxl", 4, 4), ("flux", 16, 4), ("sd3", 16, 4),
                                                          ("flux", 16, 2), ("sd3", 16, 2)])
def test_the_shapes_vae_keeps_world_images_one_latent_per_cell(family, channels, downsample):
    """World images survive encode -> decode to under 1/255, with one latent per 4 x 4 pixel cell
    (2 x 2 equal latents per cell with the FLUX/SD3 option of a VAE downsampling by 2)."""
    from diffalign.rewards.shapes_world import GRID, sample_captions
    from diffalign.world import world_batch

    policy = world_policy(build_untrained(family, 0, vae_downsample=downsample), family)
    pixels = world_batch(sample_captions(6, seed=3), list(range(6)))
    latents = policy.encode_images(pixels, generator=torch.Generator().manual_seed(0))
    per_cell = 4 // downsample
    assert tuple(latents.shape[1:]) == (channels, GRID * per_cell, GRID * per_cell) == policy.latent_shape(64, 64)
    cells = latents[..., ::per_cell, ::per_cell]
    assert torch.allclose(latents, cells.repeat_interleave(per_cell, -1).repeat_interleave(per_cell, -2), atol=1e-5)
    assert (policy.decode(latents) * 2 - 1 - pixels).abs().max() * 127.5 < 1


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux", "sd3"])
def test_build_smoke_runs_the_full_build_code(family, tmp_path):
    """Two steps of the real build (pretrain, fp16 save, manifest), then a stock reload and a sample."""
    manifest = build(WorldBuildConfig(family=family, steps=2, batch_size=2, threads=1, warmup_steps=1), tmp_path / "m",
                     log=lambda line: None, measure_scores=False)
    folder = tmp_path / "m"
    assert manifest["content_sha256"] == content_hash(folder)
    assert json.loads((folder / MANIFEST).read_text())["config"]["family"] == family
    # a world-build folder gets the shapes models' defaults, as `model: DIR` in a config would
    policy = load_policy(str(folder))
    assert policy.family == family and policy.default_resolution() == 64
    if family in ("flux", "sd3"):
        assert policy.max_sequence_length == 16
    assert pipeline_call_defaults(str(folder)) == pipeline_call_defaults(f"shapes-{family}")
    # Pretraining moved the weights away from the untrained seed-0 model.
    untrained = build_untrained(family, 0)
    name = "unet" if family in ("sd", "sdxl") else "transformer"
    before = next(iter(getattr(untrained, name).parameters()))
    after = next(iter(policy.denoiser.parameters()))
    assert after.dtype == torch.float32 and not torch.allclose(before, after, atol=3e-4)
    cond = policy.encode_prompts(["a red circle"], with_uncond=True)
    images = policy.sample(cond, 2, guidance_scale=2.0, noise_level=0.0, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64)


def test_build_timesteps_option(tmp_path):
    """--timesteps picks how noise levels are drawn (flow families); the stage command records it."""
    from diffalign.errors import UserError
    from diffalign.world import _stage_command

    config = WorldBuildConfig(family="sd3", steps=2, batch_size=2, threads=1, warmup_steps=1, timesteps="uniform")
    assert " --timesteps uniform --out DIR" in _stage_command(config)
    assert "--timesteps" not in _stage_command(WorldBuildConfig(family="sd3"))
    losses = {scheme: build(WorldBuildConfig(family="flux", steps=2, batch_size=2, threads=1, warmup_steps=1,
                                             timesteps=scheme), tmp_path / str(scheme), log=lambda line: None,
                            measure_scores=False)["final_loss"] for scheme in (None, "logit_normal", "uniform")}
    assert losses[None] == losses["logit_normal"] != losses["uniform"]
    for family, scheme in (("sd", "uniform"), ("flux", "cosine")):
        with pytest.raises(UserError, match="--timesteps .* is for --family flux or sd3"):
            build(WorldBuildConfig(family=family, steps=1, timesteps=scheme), tmp_path / "bad", measure_scores=False)
    assert not (tmp_path / "bad").exists()


def test_build_caption_weights_option(tmp_path):
    """--caption-weights draws some GenEval categories more often; the stage records one spelling of it."""
    import argparse

    from diffalign.errors import UserError
    from diffalign.world import _stage_command, _stage_config, add_build_arguments, parse_caption_weights

    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    args = parser.parse_args(["--family", "sd", "--out", "X", "--steps", "2", "--caption-weights", "color_attr=3.0, position=2"])
    config = _stage_config(args, None)
    assert config.caption_weights == "color_attr=3,position=2"
    assert " --caption-weights color_attr=3,position=2 --out DIR" in _stage_command(config)
    assert parse_caption_weights(config.caption_weights) == {"color_attr": 3.0, "position": 2.0}
    weighted = build(WorldBuildConfig(family="sd", steps=2, batch_size=2, threads=1, warmup_steps=1,
                                      caption_weights="color_attr=3"), tmp_path / "w", log=lambda line: None,
                     measure_scores=False)
    assert weighted["config"]["caption_weights"] == "color_attr=3"
    for text in ("colour_attr=3", "color_attr=0", "color_attr=x", "color_attr"):
        with pytest.raises(UserError, match=r"--caption-weights .* is not CATEGORY=WEIGHT with CATEGORY one of single_object"):
            build(WorldBuildConfig(family="sd", steps=1, caption_weights=text), tmp_path / "bad", measure_scores=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_adaln_zero_starts_the_transformer_at_zero(family, tmp_path):
    """--adaln-zero: the new transformer predicts exactly 0 (every block the identity); the stage
    command records it; two steps of training move it off zero."""
    from diffalign.errors import UserError
    from diffalign.world import _stage_command

    policy = world_policy(build_untrained(family, 0, adaln_zero=True), family)
    latents = torch.randn(2, *policy.latent_shape(64, 64), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        assert policy.predict(latents, t, policy.encode_prompts(["a red circle", ""])).abs().max() == 0
        default = world_policy(build_untrained(family, 0), family)
        assert default.predict(latents, t, default.encode_prompts(["a red circle", ""])).abs().max() > 0.01
    config = WorldBuildConfig(family=family, steps=2, batch_size=2, threads=1, warmup_steps=1, adaln_zero=True)
    assert _stage_command(config).endswith(" --adaln-zero --out DIR")
    build(config, tmp_path / "z", log=lambda line: None, measure_scores=False)
    trained = load_policy(str(tmp_path / "z"))
    with torch.no_grad():
        assert trained.predict(latents, t, trained.encode_prompts(["a red circle", ""])).abs().max() > 0
    for bad in (WorldBuildConfig(family="sd", steps=1, adaln_zero=True),
                WorldBuildConfig(family=family, steps=1, adaln_zero=True, init=str(tmp_path / "z"))):
        with pytest.raises(UserError, match="--adaln-zero initialises a new FLUX/SD3 transformer"):
            build(bad, tmp_path / "bad", measure_scores=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_vae_downsample_2_gives_a_transformer_one_token_per_cell(family, tmp_path):
    """--vae-downsample 2: a 32 x 32 latent, so 16 x 16 = 256 image tokens (64 by default); the
    stage command and manifest record it, the built folder reloads with it and samples 64 px images;
    other families and continued builds are refused before any folder is made."""
    import argparse

    from diffalign.errors import UserError
    from diffalign.world import _stage_command, _stage_config, add_build_arguments

    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    args = parser.parse_args(["--family", family, "--out", "x", "--steps", "2", "--vae-downsample", "2"])
    config = _stage_config(args, init=None)
    assert config.vae_downsample == 2
    assert _stage_command(config).endswith(" --vae-downsample 2 --out DIR")
    config.batch_size, config.threads, config.warmup_steps = 2, 1, 1
    manifest = build(config, tmp_path / "v", log=lambda line: None, measure_scores=False)
    assert manifest["config"]["vae_downsample"] == 2
    policy = load_policy(str(tmp_path / "v"))
    assert policy.pipe.vae_scale_factor == 2 and policy.latent_shape(64, 64) == (16, 32, 32)
    if family == "flux":  # FLUX packs 2 x 2 latents into one token
        assert policy.pipe._pack_latents(torch.zeros(1, 16, 32, 32), 1, 16, 32, 32).shape[1] == 256
    else:  # SD3 patches 2 x 2 latents
        assert (policy.denoiser.config.sample_size, policy.denoiser.config.pos_embed_max_size) == (32, 16)
    images = sample_world(policy, ["a red circle"], [0], num_steps=2, guidance_scale=1.5)
    assert images.shape == (1, 3, 64, 64)
    for bad in (WorldBuildConfig(family="sd", steps=1, vae_downsample=2),
                WorldBuildConfig(family=family, steps=1, vae_downsample=8),
                WorldBuildConfig(family=family, steps=1, vae_downsample=2, init=str(tmp_path / "v"))):
        with pytest.raises(UserError, match="--vae-downsample .* is not allowed; a new FLUX/SD3 model"):
            build(bad, tmp_path / "bad", measure_scores=False)
    assert not (tmp_path / "bad").exists()


def test_only_a_folder_whose_manifest_names_a_shapes_model_is_one(tmp_path):
    assert shapes_model_name("shapes-sd") == "shapes-sd" and shapes_model_name("tiny-sd") is None
    assert shapes_model_name(str(tmp_path)) is None  # no manifest: a user's model, no shapes defaults
    for text, expected in (('{"name": "shapes-sdxl"}', "shapes-sdxl"), ('{"name": "my-model"}', None),
                           ("not json", None), ("[1, 2]", None)):
        (tmp_path / MANIFEST).write_text(text)
        assert shapes_model_name(str(tmp_path)) == expected
    assert pipeline_call_defaults(str(tmp_path)) == {}


def test_build_refuses_a_non_empty_folder(tmp_path):
    from diffalign.errors import UserError

    (tmp_path / "keep.txt").write_text("user's file")
    with pytest.raises(UserError, match="exists and is not empty; choose a new folder"):
        build(WorldBuildConfig(family="sd", steps=1), tmp_path, measure_scores=False)
    assert (tmp_path / "keep.txt").read_text() == "user's file"


def test_shapes_sd_is_shipped():
    assert "shapes-sd" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_match_their_manifest(name):
    folder = SHAPES_ROOT / name
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["name"] == name
    assert manifest["content_sha256"] == content_hash(folder)
    assert set(manifest["base_scores"]) == {"single_object", "train", "held_out_compositional"}


def test_shipped_weights_fit_the_budget():
    total = sum(p.stat().st_size for p in SHAPES_ROOT.rglob("*") if p.is_file())
    assert total <= 40 * 1024 * 1024


@pytest.mark.parametrize("name", SHIPPED)
def test_stock_from_pretrained_loads_it_without_diffalign(name):
    path = resolve_model_path(name)
    extra = ", max_sequence_length=16" if name in ("shapes-flux", "shapes-sd3") else ""
    code = (
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline\n"
        # fp16 storage: ask for fp32 (the VAE is stored in fp32), as diffalign's loader does
        f"pipe = DiffusionPipeline.from_pretrained({str(path)!r}, torch_dtype=torch.float32)\n"
        "out = pipe('a red circle', num_inference_steps=2, height=64, width=64, output_type='np',\n"
        f"           generator=torch.Generator().manual_seed(0){extra}).images\n"
        "assert not [m for m in sys.modules if m.startswith('diffalign')]\n"
        "print(type(pipe).__name__, out.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                         "PATH": "/usr/bin:/bin"}, check=True).stdout.split()
    expected = {"shapes-sd": "StableDiffusionPipeline", "shapes-sdxl": "StableDiffusionXLPipeline",
                "shapes-flux": "FluxPipeline", "shapes-sd3": "StableDiffusion3Pipeline"}[name]
    assert out[0] == expected and out[-1] == "3)"


def test_export_shapes_writes_a_diffusers_folder(tmp_path):
    from diffalign.cli import main

    name = SHIPPED[-1]
    assert main(["export-tiny", name, str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"].endswith("Pipeline")
    assert content_hash(tmp_path / "out") == json.loads((tmp_path / "out" / MANIFEST).read_text())["content_sha256"]
    # the end of a run's summary on a shapes model: the export command, then a line that loads the export
    from diffalign.console import run_summary_lines

    header, load = run_summary_lines(tmp_path / "run", "run/final", name, report=False)
    assert f"`diffalign export-tiny {name} ./{name}`" in header
    import torch
    from diffusers import DiffusionPipeline

    code = load.split(";")[0].strip().replace(f'"./{name}"', repr(str(tmp_path / "out")))
    scope = {"DiffusionPipeline": DiffusionPipeline, "torch": torch}
    exec(code, scope)  # noqa: S102 - the printed line itself, pointed at the export
    pipe = scope["pipe"]
    assert {p.dtype for p in (getattr(pipe, "transformer", None) or pipe.unet).parameters()} == {torch.float32}


@pytest.mark.parametrize("name", SHIPPED)
def test_the_default_build_is_the_shipped_recipe(name):
    """`diffalign world build --family F --out DIR` (no recipe options) runs the stages recorded in
    the shipped manifest; its last stage parses to the settings that manifest records."""
    import argparse
    import shlex
    from dataclasses import asdict

    from diffalign.world import _shipped_manifest, _stage_config, add_build_arguments, recipe_commands

    manifest = json.loads((SHAPES_ROOT / name / MANIFEST).read_text())
    assert _shipped_manifest(manifest["config"]["family"]) == manifest
    commands = recipe_commands(manifest)
    assert commands == manifest["previous_stages"] + [manifest["command"]]
    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    last = _stage_config(parser.parse_args(shlex.split(commands[-1])[3:]), init=None)
    # timesteps, caption_weights, adaln_zero and vae_downsample came after the first builds; None (the default) is what those used
    recorded = {"timesteps": None, "caption_weights": None, "adaln_zero": None, "vae_downsample": None, **{k: v for k, v in manifest["config"].items() if k not in ("init", "start_step")}}
    assert {k: v for k, v in asdict(last).items() if k not in ("init", "start_step")} == recorded


def test_a_staged_rebuild_reproduces_the_shipped_files(tmp_path, monkeypatch):
    """A two-stage recipe (two steps each), built stage by stage, then rebuilt from scratch by
    build_shipped: the same content hash, the same stage history, no stage folder left behind."""
    import diffalign.world as world

    commands = [f"diffalign world build --family sd --seed 0 --steps 2 --batch-size 2 --learning-rate {lr} --threads 1 "
                f"--eval-seeds 1 --guidance-scale 1.5 --out DIR" for lr in ("0.001", "0.0005")]
    commands[1] += " --init STAGE1"
    first = build(WorldBuildConfig(family="sd", steps=2, batch_size=2, learning_rate=1e-3, threads=1, eval_seeds=1),
                  tmp_path / "stage1", command=commands[0], log=lambda line: None, measure_scores=False)
    shipped = build(WorldBuildConfig(family="sd", steps=2, batch_size=2, learning_rate=5e-4, threads=1, eval_seeds=1,
                                     init=str(tmp_path / "stage1")),
                    tmp_path / "shipped" / "shapes-sd", command=commands[1], log=lambda line: None, measure_scores=False)
    assert shipped["previous_stages"] == [commands[0]] and first["content_sha256"] != shipped["content_sha256"]
    monkeypatch.setattr(world, "SHIPPED_DIR", tmp_path / "shipped")
    lines = []
    rebuilt = world.build_shipped("sd", tmp_path / "again", log=lines.append, measure_scores=False)
    assert rebuilt["content_sha256"] == shipped["content_sha256"] == content_hash(tmp_path / "again")
    assert rebuilt["previous_stages"] == [commands[0]] and rebuilt["command"] == commands[1]
    assert rebuilt["config"]["start_step"] == 2
    assert any("matches the shipped weights" in line for line in lines), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "shipped", "stage1"]
