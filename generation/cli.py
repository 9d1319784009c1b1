"""``pstudy generate``: train autoencoders with each loss and write a stimulus set."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from generation.config import PRESETS, ConfigError


def _echo(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


@click.command("generate", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="demo",
    show_default=True,
    help="Starting settings: smoke (seconds), demo (all conditions, ~5 min on 2 CPU "
    "cores), paper (64×64 VAE at equal rate, GPU-sized), paper-cpu (its shape at 32×32, "
    "a few minutes on 2 CPU cores).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML or TOML file with settings over the preset.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one setting, e.g. --set train.steps=200 (repeatable).",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    help="Folder of images (recursive) instead of scikit-image's photographs.",
)
@click.option(
    "--conditions",
    help="Comma-separated losses to train, one condition each "
    "(e.g. l2,ssim,deep); composites with ';' (l2:1,deep:0.1;l1).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("stimuli"),
    show_default=True,
    help="Stimulus-set folder to write (checkpoints go to OUT.checkpoints).",
)
@click.option(
    "--checkpoints",
    type=click.Path(file_okay=False, path_type=Path),
    help="Checkpoint folder (default: OUT.checkpoints).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto = CUDA when present, else CPU.",
)
@click.option("--resume", is_flag=True, help="Continue each condition from its last checkpoint.")
@click.option(
    "--reuse/--no-reuse",
    default=True,
    show_default=True,
    help="Keep OUT as it is when it already holds a valid set from the same config and inputs.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="CPU threads for torch (default: torch's choice; 1 is often fastest for small "
    "models on a busy machine).",
)
@click.option(
    "--strict/--no-strict",
    default=None,
    help="Fail (exit code 1, with the reason and the likely fix) when a condition's "
    "reconstructions are degenerate: flat, one image for all inputs, black/saturated, grid "
    "artefacts, NaN. Default: the preset's guard.strict (on for paper, paper-cpu).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def generate(
    preset,
    config_file,
    overrides,
    data_dir,
    conditions,
    out_dir,
    checkpoints,
    device,
    resume,
    reuse,
    threads,
    strict,
    quiet,
):
    """Train one autoencoder per loss and write their reconstructions of held-out
    images as a stimulus set (manifest.json, reference/, one folder per condition,
    evaluation.csv, contact_sheet.png).

    \b
    Examples:
      pstudy generate --preset smoke --out /tmp/smoke
      pstudy generate --preset demo --out instance/stimuli/demo
      pstudy generate --conditions l2,ssim --set train.steps=2000 --out out/
      pstudy generate --data ~/celeba --set data.image_size=64 \\
          --set "data.crop_box=[25,45,153,178]" --preset paper --out celeba-set
      pstudy generate --config study.yaml --resume --out out/
      torchrun --standalone --nproc_per_node 4 -m generation --preset paper --out out/
    """
    from generation.config import resolve_config
    from generation.data import DataError
    from generation.stimulus_set import StimulusSetError
    from generation.train import TrainingError

    extra: dict = {}
    if data_dir is not None:
        extra["data"] = {"source": str(data_dir)}
    if conditions is not None:
        separator = ";" if ";" in conditions else ","
        extra["conditions"] = [c.strip() for c in conditions.split(separator) if c.strip()]
    if strict is not None:
        extra["guard"] = {"strict": strict}
    try:
        config = resolve_config(preset, config_file, overrides, extra)
        _check_losses(config)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None

    import torch

    from generation.pipeline import generate as run

    if threads is not None:
        torch.set_num_threads(threads)

    try:
        result = run(
            config,
            out_dir,
            device=device,
            resume=resume,
            reuse=reuse,
            progress=not quiet,
            checkpoint_dir=checkpoints,
            log=_echo,
        )
    except (DataError, StimulusSetError, TrainingError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        from generation.pipeline import default_checkpoint_dir

        kept = Path(checkpoints) if checkpoints else default_checkpoint_dir(out_dir)
        click.echo(f"\ninterrupted; checkpoints so far are in {kept} — run the same command "
                   "with --resume to continue", err=True)
        sys.exit(130)
    finally:
        from generation.train import end_distributed

        end_distributed()
    if result.manifest is None:  # a non-main torchrun rank
        return
    click.echo(f"stimulus set: {result.out} ({'reused' if result.reused else 'written'})")
    click.echo(condition_table(result.manifest))


def condition_table(manifest: dict) -> str:
    """One line per condition: PSNR, KL (VAE), the guard's verdict."""
    lines = []
    for c in manifest["conditions"]:
        parts = [f"{c['name']}: PSNR {c['metrics'].get('psnr', float('nan')):.2f} dB"]
        if "kl" in c["metrics"]:
            parts.append(f"KL {c['metrics']['kl']:.0f} nats")
        if c.get("guard"):
            parts.append(f"guard {c['guard']['verdict']}")
        lines.append(", ".join(parts))
    return "\n".join(lines)


def _check_losses(config: dict) -> None:
    """Unknown loss or metric names fail before any data is read or model trained."""
    from generation.losses import available_losses, build_loss, parse_spec

    metrics = config["evaluate"]["metrics"]
    if metrics != "all":
        unknown = [m for m in metrics if m != "psnr" and m not in available_losses()]
        if unknown:
            raise ConfigError(
                f"evaluate.metrics: unknown metric(s) {', '.join(unknown)}; choose from psnr, "
                f"{', '.join(available_losses())} (or 'all')"
            )

    for condition in config["conditions"]:
        try:
            parse_spec(condition["loss"])
            if condition.get("loss_options"):  # unknown options fail before any training
                build_loss(condition["loss"], **condition["loss_options"])
        except ValueError as error:
            raise ConfigError(f"condition {condition['name']!r}: {error}") from None
