"""The ``diffalign`` command line.

    diffalign train CONFIG [key=value ...] [--dry-run] [--overwrite]
    diffalign generate --model M [--lora DIR] [--npo DIR] (--prompt TEXT --out FILE | --prompts FILE --out DIR)
    diffalign export-lora RUN/final --format kohya --out model.safetensors   [--merge]
    diffalign export-tiny {sd,sdxl,flux,sd3,shapes-sd,...} OUT_DIR
    diffalign world build --family {sd,sdxl,flux,sd3} --out DIR   (the shapes-world models)
    diffalign world pairs --model shapes-sd --out DIR        (builtin:shapes pairs as parquet)
    diffalign world compare --model shapes-sd --lora RUN/final --out grid.png
    diffalign score ...            (see diffalign score --help)
    diffalign sample CONFIG --out DIR   (D3PO human-feedback pairs)
    diffalign label DIR [--name N] | label export DIR --out DIR2   (label pairs in the browser)
    diffalign report RUN_DIR       (rebuild RUN_DIR/report.html)
    diffalign serve-reward REWARD[:opts] [--host H --port N]   (then reward: remote:url=http://H:N)
    diffalign methods | rewards | explain METHOD

Multi-GPU: ``accelerate launch -m diffalign.cli train CONFIG``.

Exit status: 0 done; 2 a mistake in the input (one ``error:`` line, always the last line printed);
75 (EX_TEMPFAIL) a run stopped by SIGINT/SIGTERM after checkpointing its step, so a scheduler can
requeue it with ``resume=latest``; 130 interrupted at once (a second Ctrl-C, or one during
start-up, before training began).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diffalign.errors import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from diffalign.config import config_to_yaml, describe_batch, get_method, load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from diffalign.preflight import check_inputs

        check_inputs(cfg)  # files, model folder and reward names too, as a real start would
        print(config_to_yaml(cfg), end="")
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
        print(describe_batch(cfg, num_processes, None, items_per_sample=type(cfg).batch_unit))
        print("dry run: config is valid; nothing was trained")
        return 0
    _, trainer_cls = get_method(cfg.method)
    trainer_cls(cfg, overwrite=args.overwrite).train()
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from diffalign.pipelines.loading import load_pipeline, pipeline_call_defaults

    if args.prompts is not None:  # check the cheap things before loading a model
        from diffalign.data import load_prompts

        prompts = load_prompts(args.prompts, key="--prompts")
        out = Path(args.out)
        if out.suffix or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
            raise UserError(f"--out {out}: with --prompts give a new or empty folder (images are numbered inside it)")
    pipe = load_pipeline(args.model)
    is_flux = type(pipe).__name__ == "FluxPipeline"
    if args.npo and is_flux and args.true_cfg_scale is None:
        raise UserError("--npo on FLUX acts through true CFG's negative pass: add --true-cfg-scale (e.g. 4.0)")
    if args.true_cfg_scale is not None and not is_flux:
        raise UserError("--true-cfg-scale is for FLUX pipelines; SD/SDXL/SD3 use --guidance-scale (SD3: true CFG already)")
    pipe.to(args.device)
    if args.lora:
        _load_lora_for_generate(pipe, args.lora)
    if args.npo:
        from diffalign.pipelines.npo import apply_npo_to_pipeline

        apply_npo_to_pipeline(pipe, args.npo, args.npo_scale, args.npo_merge_weight)
    kwargs = pipeline_call_defaults(args.model)
    for key in ("height", "width"):
        if getattr(args, key):
            kwargs[key] = getattr(args, key)
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    if args.true_cfg_scale is not None:
        kwargs["true_cfg_scale"] = args.true_cfg_scale
        kwargs.setdefault("negative_prompt", "")  # true CFG needs a negative branch

    def images_for(prompt: str, seed: int):
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt, num_inference_steps=args.steps, generator=generator,
                    num_images_per_prompt=args.num_images, **kwargs).images

    if args.prompts is None:
        images = images_for(args.prompt, args.seed)
        root, ext = os.path.splitext(args.out)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        for i, image in enumerate(images):
            path = args.out if len(images) == 1 else f"{root}-{i}{ext or '.png'}"
            image.save(path)
            print(path)
        return 0

    # --prompts: a folder of NNNNN[-j].png, prompt i with seed --seed + i (the same images for the
    # same prompt and seed whatever else is in the file, so runs with and without a LoRA pair up),
    # and prompts.txt naming each image's prompt in file-name order for `diffalign score`.
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, prompt in enumerate(prompts):
        for j, image in enumerate(images_for(prompt, args.seed + i)):
            name = f"{i:05d}.png" if args.num_images == 1 else f"{i:05d}-{j}.png"
            image.save(out / name)
            names.append(prompt)
    (out / "prompts.txt").write_text("".join(f"{prompt}\n" for prompt in names))
    print(f"wrote {len(names)} images for {len(prompts)} prompts to {out}/ "
          f"(score them: diffalign score {out} --prompts {out / 'prompts.txt'} --reward NAME)")
    return 0


def _load_lora_for_generate(pipe, path: str) -> None:
    """``--lora``: a LoRA folder (``final/``) or file, or a training checkpoint ``checkpoints/step-N``
    (its weights, with the LoRA settings of the run's config). Another family's LoRA is an error."""
    from diffalign.lora import LORA_WEIGHT_NAME, family_of_pipeline, read_lora_metadata

    where = Path(path)
    if not where.exists():
        raise UserError(f"--lora {path}: no such file or folder; pass the run's final/ folder")
    family = family_of_pipeline(pipe)
    if where.is_dir() and not (where / LORA_WEIGHT_NAME).is_file():
        if (where / "lora.safetensors").is_file() and (where / "state.json").is_file():
            _load_checkpoint_lora(pipe, where, family)
            return
        raise UserError(
            f"--lora {path}: no {LORA_WEIGHT_NAME} in this folder; pass a run's final/ folder or one of its "
            "checkpoints/step-N folders"
        )
    metadata = read_lora_metadata(where)
    if metadata.get("family") and metadata["family"] != family:
        raise UserError(
            f"--lora {path}: the LoRA was trained on a {metadata['family']} model but --model is a {family} "
            "model; use the base model it was trained on"
        )
    try:
        pipe.load_lora_weights(str(where))
    except (ValueError, KeyError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--lora {path}: this LoRA does not fit the {family} model ({reason[:160]})") from None


def _load_checkpoint_lora(pipe, folder: Path, family: str) -> None:
    """Load the LoRA of a training checkpoint into ``pipe``'s denoiser, as the run built it."""
    import safetensors.torch

    from diffalign import lora
    from diffalign.checkpoint import read_saved_config
    from diffalign.config import LoraSettings

    saved = read_saved_config(folder)
    if saved is None or not isinstance(saved.get("lora"), dict):
        raise UserError(f"--lora {folder}: a checkpoint without its run's config.yaml; pass the run's final/ folder")
    trained = _family_of_model(str(saved.get("model") or ""))
    if trained not in (None, family):
        raise UserError(
            f"--lora {folder}: the checkpoint trained a {trained} model but --model is a {family} model; "
            "use the base model it was trained on"
        )
    settings = LoraSettings.model_validate(saved["lora"])
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    positional = lora.add_lora(denoiser, family, settings)
    stored = safetensors.torch.load_file(str(folder / "lora.safetensors"))
    if all(key.isdigit() for key in stored):  # saved from the list add_lora returns
        keys, values = [str(i) for i in range(len(positional))], list(positional)
    else:
        named = lora.lora_parameters(denoiser)
        keys, values = list(named), list(named.values())
    if sorted(keys) != sorted(stored) or any(stored[k].shape != p.shape for k, p in zip(keys, values)):
        raise UserError(
            f"--lora {folder}: the checkpoint's weights do not fit the {family} model with its LoRA settings; "
            "use the base model it was trained on"
        )
    import torch

    with torch.no_grad():
        for key, param in zip(keys, values):
            param.copy_(stored[key].to(param.dtype))
            param.requires_grad_(False)


def _family_of_model(model: str) -> str | None:
    try:
        from diffalign.pipelines.loading import detect_family

        return detect_family(model)
    except Exception:  # a hub id, or a folder moved since: nothing to compare
        return None


def _cmd_export_tiny(args: argparse.Namespace) -> int:
    from diffalign.pipelines.loading import export_embedded

    name = args.family if args.family.startswith(("tiny-", "shapes-")) else f"tiny-{args.family}"
    try:
        out = export_embedded(name, args.out_dir)
    except FileExistsError as err:
        raise UserError(str(err)) from err
    print(f"wrote {name} to {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from diffalign.report import write_report

    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        raise UserError(f"report: {args.run_dir} holds no metrics.jsonl; pass a run's output_dir")
    print(write_report(args.run_dir))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from diffalign.config import list_methods

    print("\n".join(list_methods()))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from diffalign.config import explain_config, get_method

    config_cls, _ = get_method(args.method)
    print("\n".join(explain_config(config_cls)))
    return 0


def _cmd_rewards(args: argparse.Namespace) -> int:
    from diffalign.rewards.registry import describe_rewards

    rows = describe_rewards()
    if args.names:
        print("\n".join(row["name"] for row in rows))
        return 0
    columns = ("name", "differentiable", "weights")
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    for row in [dict(zip(columns, columns))] + rows:
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description="Align text-to-image diffusion models with human preference.")
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' progress bars and logs "
                        "(diffusers, transformers); may follow any command")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a YAML recipe")
    train.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=2e-5 model=/path")
    train.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, train nothing")
    train.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output_dir")
    train.set_defaults(func=_cmd_train)

    gen = commands.add_parser("generate", help="generate images with a stock pipeline (+ a trained LoRA)")
    gen.add_argument("--model", required=True, help="hub id, diffusers directory, or tiny-sd | tiny-sdxl | tiny-flux | tiny-sd3")
    gen.add_argument("--lora", help="LoRA folder to load with pipe.load_lora_weights (e.g. runs/x/final)")
    gen.add_argument("--npo", help="negative LoRA folder used for the unconditional branch (Diffusion-NPO)")
    gen.add_argument("--npo-scale", type=float, default=1.0, help="strength of the negative LoRA")
    gen.add_argument("--npo-merge-weight", type=float, default=0.0,
                     help="beta: the negative branch runs the positive LoRAs at 1 - beta (0 = full, 1 = base + negative)")
    which = gen.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="one prompt; --out is the PNG path")
    which.add_argument("--prompts", metavar="FILE", help="a text file, one prompt per line; --out is a folder")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance-scale", type=float, help="CFG scale (FLUX.1-dev: its embedded guidance)")
    gen.add_argument("--true-cfg-scale", type=float, help="FLUX only: real classifier-free guidance with a negative pass")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--out", required=True, help="output PNG path (numbered when --num-images > 1), or the folder "
                     "for --prompts")
    gen.set_defaults(func=_cmd_generate)

    export = commands.add_parser("export-tiny", help="write an embedded tiny model as a diffusers directory")
    export.add_argument("family", choices=["sd", "sdxl", "flux", "sd3", "tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-sd3",
                                           "shapes-sd", "shapes-sdxl", "shapes-flux", "shapes-sd3"])
    export.add_argument("out_dir")
    export.set_defaults(func=_cmd_export_tiny)

    from diffalign.export import add_export_arguments, run_export

    export_lora = commands.add_parser("export-lora", help="a trained LoRA as a kohya file (ComfyUI, A1111/Forge), or --merge into the model")
    add_export_arguments(export_lora)
    export_lora.set_defaults(func=run_export)

    from diffalign.label import add_label_arguments, run_label

    label = commands.add_parser("label", help="label image pairs in the browser (D3PO labels; `label export`: Pick-a-Pic parquet)")
    add_label_arguments(label)
    label.set_defaults(func=run_label)
    world = commands.add_parser("world", help="the shapes world: rebuild its pretrained models")
    world_commands = world.add_subparsers(dest="world_command", required=True)
    world_build = world_commands.add_parser("build", help="pretrain a shapes-<family> model from scratch, deterministically")
    from diffalign.world import add_build_arguments, run_build

    add_build_arguments(world_build)
    world_build.set_defaults(func=run_build)
    from diffalign.world_data import add_world_commands

    add_world_commands(world_commands)

    score = commands.add_parser("score", help="score images (or image pairs) with registry rewards")
    from diffalign.scoring import add_score_arguments, run_score

    add_score_arguments(score)
    score.set_defaults(func=run_score)

    try:
        from diffalign.feedback import add_sample_arguments, run_sample
    except ImportError:
        pass
    else:
        sample = commands.add_parser("sample", help="sample image pairs for human labelling (D3PO)")
        add_sample_arguments(sample)
        sample.set_defaults(func=run_sample)

    report = commands.add_parser("report", help="rebuild a run's report.html (plots, sample grids, config, guard)")
    report.add_argument("run_dir", help="the run's output_dir")
    report.set_defaults(func=_cmd_report)
    serve = commands.add_parser("serve-reward", help="serve a registry reward over HTTP (use it as reward: remote:url=...)")
    from diffalign.reward_server import add_serve_arguments, run_serve

    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)

    commands.add_parser("methods", help="list training methods").set_defaults(func=_cmd_methods)
    explain = commands.add_parser("explain", help="every config key of a method, with type, default and meaning")
    explain.add_argument("method")
    explain.set_defaults(func=_cmd_explain)
    rewards = commands.add_parser("rewards", help="list registered rewards: differentiable or not, and the weights each needs")
    rewards.add_argument("--names", action="store_true", help="names only, one per line")
    rewards.set_defaults(func=_cmd_rewards)
    return parser


def main(argv: list[str] | None = None) -> int:
    # --verbose may stand anywhere (`diffalign train cfg.yaml --verbose`); set up the output first,
    # before any library that prints is imported.
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:  # from the first import on: a Ctrl-C while torch loads is one line too
        from diffalign.console import configure_output

        verbose = "--verbose" in argv
        configure_output(verbose)
        from diffalign.guard import GuardStopped

        parser = build_parser()
        args, extra = parser.parse_known_args([word for word in argv if word != "--verbose"])
        # argparse stops collecting positional overrides at the first flag (e.g. after --dry-run);
        # `train` takes the remaining key=value words wherever they stand.
        if extra and args.command == "train" and not any(word.startswith("-") for word in extra):
            args.overrides = list(args.overrides) + extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args.func(args) or 0)
    except UserError as err:
        return _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        run = sys.modules.get("diffalign.run")  # (never imported here: torch may be half-imported)
        checkpoint = run.last_checkpoint_of_live_runs() if run is not None else None
        if checkpoint is not None:
            return _fail(f"interrupted; the last checkpoint {checkpoint} is intact (continue with resume=latest)", 130)
        if command == "train":
            return _fail("interrupted before training began; nothing was trained", 130)
        return _fail("interrupted", 130)
    except GuardStopped as stop:  # the run ended early as guard.action asked, its final LoRA written
        print(stop, file=sys.stderr)
        return 0
    except OSError as err:
        message = _os_error_message(err)
        if message is None:
            raise
        return _fail(message, 2)


def _fail(message: str, code: int) -> int:
    """Close what diffalign shows (progress bars), then print the one error line last."""
    if "diffalign.run" in sys.modules:
        sys.modules["diffalign.run"].abort_live_runs()
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr)
    return code


def _os_error_message(err: OSError) -> str | None:
    """One line for the operating-system errors a user can fix: a full disk, no permission."""
    import errno

    from diffalign.files import is_disk_full

    where = f" {err.filename}" if err.filename else ""
    if is_disk_full(err):
        run = sys.modules.get("diffalign.run")
        checkpoint = run.last_checkpoint_of_live_runs() if run is not None else None
        intact = f"the previous checkpoint {checkpoint} is intact" if checkpoint else "no checkpoint was written"
        return f"disk full while writing{where}; {intact}"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {err.strerror}; choose a folder you can write to (e.g. output_dir=...)"
    return None

if __name__ == "__main__":
    sys.exit(main())
