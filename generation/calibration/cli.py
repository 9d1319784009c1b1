"""``pstudy losses fit`` and ``pstudy losses show``: calibrate a loss on 2AFC judgments."""

from __future__ import annotations

from pathlib import Path

import click

from generation.losses.fitted import FITTABLE_LOSSES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def losses() -> None:
    """Fit loss parameters on human 2AFC judgments, and inspect fitted files.

    \b
    Examples:
      pstudy losses fit --loss watson-dft --bapps ~/bapps/2afc/train --out fit/watson-dft.pt
      pstudy losses fit --loss deep --responses votes.csv --stimuli stimuli/demo --out fit/deep.pt
      pstudy losses fit --loss watson-dct --csv judgments.csv --out fit/watson-dct.pt
      pstudy losses show fit/watson-dft.pt
    """


def _load(bapps, csv, responses, stimuli):
    from generation.calibration.judgments import JudgmentsError, load_bapps, load_csv, load_export

    given = [
        name
        for name, value in (("--bapps", bapps), ("--csv", csv), ("--responses", responses))
        if value
    ]
    if len(given) != 1:
        raise click.UsageError(
            "give exactly one input: --bapps DIR, --csv FILE, or --responses FILE with --stimuli DIR"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if responses and not stimuli:
        raise click.UsageError(
            "--responses needs --stimuli DIR (the stimulus set the study showed)"
        )
    if stimuli and not responses:
        raise click.UsageError("--stimuli goes with --responses FILE (a platform export)")
    try:
        if bapps:
            return load_bapps(bapps)
        if csv:
            return load_csv(csv)
        return load_export(responses, stimuli)
    except JudgmentsError as error:
        raise click.ClickException(str(error)) from None


@losses.command("fit")
@click.option(
    "--loss",
    "loss_name",
    required=True,
    type=click.Choice(FITTABLE_LOSSES),
    help="The loss whose parameters to fit.",
)
@click.option(
    "--bapps",
    type=click.Path(path_type=Path),
    help="A BAPPS-style 2AFC folder (ref/, p0/, p1/, judge/).",
)
@click.option(
    "--csv", type=click.Path(path_type=Path), help="A CSV with columns ref, a, b, fraction_a."
)
@click.option(
    "--responses",
    type=click.Path(path_type=Path),
    help="A platform export (contract-2 CSV/Parquet).",
)
@click.option("--stimuli", type=click.Path(path_type=Path), help="The stimulus set of --responses.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Weights file to write [fitted/<loss>.pt]; the card goes next to it.",
)
@click.option(
    "--validation",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of reference images held out for early stopping and the card's scores.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Split, head initialisation, batch order, bootstrap.",
)
@click.option(
    "--lr", default=5e-2, show_default=True, type=float, help="Adam step of the loss parameters."
)
@click.option(
    "--head-lr", default=5e-3, show_default=True, type=float, help="Adam step of the ranking head."
)
@click.option(
    "--batch-size", default=50, show_default=True, type=click.IntRange(1), help="Triplets per step."
)
@click.option("--max-epochs", default=30, show_default=True, type=click.IntRange(1))
@click.option(
    "--patience",
    default=5,
    show_default=True,
    type=click.IntRange(1),
    help="Epochs without a better validation score before stopping.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads for torch.")
@click.option(
    "--trunk-weights",
    type=click.Path(path_type=Path),
    default=None,
    help="deep/lpips-*: the backbone's ImageNet weights file (else the offline default / torch cache).",
)
@click.option(
    "--init",
    "init_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Start from a fitted-loss file (e.g. converted by `pstudy losses import`) instead of the defaults.",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
def fit(
    loss_name,
    bapps,
    csv,
    responses,
    stimuli,
    out,
    validation,
    seed,
    lr,
    head_lr,
    batch_size,
    max_epochs,
    patience,
    device,
    threads,
    trunk_weights,
    init_file,
    progress,
):
    """Fit LOSS on 2AFC judgments; write the weights file and its JSON model card.

    Use the result with build_loss(LOSS, weights=FILE) or, in a generation config,
    loss: LOSS with loss_options: {weights: FILE}.
    """
    import torch

    from generation.calibration.card import build_card, card_path, format_card, write_card
    from generation.calibration.fit import FitSettings, fit_loss
    from generation.calibration.judgments import JudgmentsError, split_by_group
    from generation.losses import build_loss
    from generation.losses.fitted import save_fitted
    from generation.stimulus_set import sha256_file

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.ClickException(f"--device {device}: no CUDA device here; use --device cpu")
    triplets = _load(bapps, csv, responses, stimuli)
    try:
        train, val = split_by_group(triplets, validation, seed)
        settings = FitSettings(
            lr=lr,
            head_lr=head_lr,
            batch_size=batch_size,
            max_epochs=max_epochs,
            patience=patience,
            seed=seed,
        )
        settings.check()
        if trunk_weights and loss_name.startswith("watson"):
            raise ValueError(f"--trunk-weights applies to deep and lpips-* only, not {loss_name}")
        if init_file and trunk_weights:
            raise ValueError("--init and --trunk-weights cannot be combined (both set weights=)")
        start = init_file or trunk_weights
        module = build_loss(loss_name, **({"weights": str(start)} if start else {}))
        if min(triplets.images.shape[-2:]) < getattr(module, "min_size", 1):
            raise ValueError(
                f"{loss_name} needs images of at least {module.min_size} px; the judgments' images are {tuple(triplets.images.shape[-2:])}"
            )
        result = fit_loss(module, train, val, settings, device=device, progress=progress)
    except (JudgmentsError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    out = out or Path("fitted") / f"{loss_name}.pt"
    options = {"start": module.start} if hasattr(module, "start") else {}
    save_fitted(out, loss_name, options, result.module)
    card = build_card(
        loss=loss_name,
        options=options,
        result=result,
        train=train,
        validation=val,
        weights_path=out,
        split={"seed": seed, "validation_share": validation},
        device=device,
        seed=seed,
    )
    if init_file:
        card["training"]["init"] = {"path": str(init_file), "sha256": sha256_file(init_file)}
    write_card(card, card_path(out))
    click.echo(format_card(card))
    click.echo(f"wrote {out} and {card_path(out)}")


@losses.command("show")
@click.argument("file", type=click.Path(path_type=Path))
def show(file):
    """Print the model card of a fitted weights FILE (or of FILE.card.json)."""
    import json

    from generation.calibration.card import format_card, read_card

    try:
        card = read_card(file)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    click.echo(format_card(card))
    history = card["training"].get("history", [])
    if history:
        click.echo("history (epoch, steps, train BCE, validation 2AFC):")
        for row in history:
            click.echo(
                f"  {json.dumps([row['epoch'], row['steps'], row['train_bce'], row['val_2afc']])}"
            )


@losses.command("import")
@click.argument("kind", type=click.Choice(["czolbe", "lpips"]))
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--loss", "loss_name", required=True, type=click.Choice(FITTABLE_LOSSES))
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Fitted-loss file to write."
)
def import_weights(kind, file, loss_name, out):
    """Convert published weights (a file you supply) into a fitted-loss file.

    \b
    KIND czolbe: Czolbe et al.'s Watson state dict (rgb_/gray_watson_dct|fft_trial0.pth)
                 for --loss watson-dct or watson-dft;
    KIND lpips:  the lpips package's linear layers (lpips/weights/v0.1/<net>.pth)
                 for --loss lpips-alex, lpips-vgg or lpips-squeeze.
    \b
    Example:
      pstudy losses import czolbe rgb_watson_fft_trial0.pth --loss watson-dft --out fitted/czolbe-dft.pt
    """
    from generation.losses import build_loss
    from generation.losses.fitted import write_fitted
    from generation.losses.published import czolbe_watson_payload, lpips_linear_payload

    try:
        if kind == "czolbe":
            payload = czolbe_watson_payload(file, loss_name)
        elif not loss_name.startswith("lpips-"):
            raise ValueError(
                f"lpips linear layers convert to lpips-alex|vgg|squeeze, not {loss_name}"
            )
        else:
            payload = lpips_linear_payload(file, loss_name.removeprefix("lpips-"))
        write_fitted(out, payload)
        if kind == "czolbe":  # the file loads (lpips trunks may need ImageNet weights first)
            build_loss(loss_name, weights=str(out))
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {out} ({loss_name}, {len(payload['state_dict'])} tensors from {file})")
