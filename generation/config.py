"""Generation configuration: presets, YAML/TOML files and ``key=value`` overrides.

A configuration is a plain nested mapping (JSON types only) so it can be hashed and
written into the manifest unchanged. :func:`resolve_config` layers, in order: the
built-in defaults, a preset (``smoke``, ``demo``, ``paper``), a file, dotted overrides
(``train.steps=200``), and returns a validated, fully populated mapping. Unknown keys
and wrong types raise :class:`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ARCHITECTURES = ("conv", "fc", "vae")
UPSAMPLING = ("transpose", "nearest")  # conv decoders: transposed conv | resize + conv

DEFAULTS: dict[str, Any] = {
    "name": "stimuli",
    "seed": 0,
    "data": {
        # "skimage" = patches of scikit-image's photographs; anything else = an image folder
        "source": "skimage",
        "image_size": 32,  # side of the square images, pixels
        "channels": 3,  # 1 (greyscale) or 3 (RGB)
        "crop_box": None,  # [left, top, right, bottom] pixels, applied before resizing
        "test_fraction": 0.2,  # share of folder images held out (seeded split)
        "n_test": 12,  # held-out images that become stimuli
        "train_patches": 4096,  # skimage only: random training patches
        "patch_scale": 4.0,  # skimage only: photo short side is rescaled to this × size
    },
    "model": {
        "architecture": "conv",  # conv | fc | vae
        "latent": 64,  # latent dimensions
        "width": 32,  # channels of the first conv layer (fc: hidden units / 16)
        "upsample": "transpose",  # conv/vae decoder: transpose | nearest (resize + 3×3 conv)
    },
    "train": {
        "steps": 600,  # optimiser steps per condition
        "batch_size": 32,
        "lr": 1e-3,  # Adam learning rate
        "lr_halve_every": 0,  # steps; 0 = constant learning rate
        "recon_weight": 1.0,  # λ in λ·reconstruction + KL (VAE) or λ·reconstruction
        # VAE only: the rate (KL, nats per image) every condition is trained to. null = the
        # fixed objective recon_weight·d + KL; a number = minimise d subject to KL = target,
        # with a Lagrange multiplier β adapted during training (docs/generation.md)
        "kl_target": None,
        "kl_dual_lr": 0.05,  # step size of the multiplier's update, on log β per step
        "kl_beta_init": 1.0,  # starting β (dimensionless: d is divided by its zero-rate value)
        "adversarial_weight": 0.0,  # > 0 adds a small discriminator (DeePSiM-style)
        "checkpoint_every": 200,  # steps
        "num_workers": -1,  # data loader workers; -1 = auto (0 on CPU, 4 on CUDA)
        # under torchrun: "conditions" = each process trains whole conditions (round-robin;
        # results identical to one process), "data" = every process takes a share of each
        # batch (DistributedDataParallel). How the work is spread, not what is computed:
        # outside the config hash (EXECUTION_KEYS)
        "distribute": "conditions",
    },
    # one entry per condition: a loss name/spec, or a mapping with name/loss and overrides
    "conditions": ["l1", "l2"],
    "evaluate": {
        "metrics": "all",  # "all" registered losses (+ PSNR) or a list of names
    },
    "contact_sheet": {
        "columns": 8,  # test images shown
        "scale": 3,  # integer enlargement of each image
    },
    "guard": {
        # true: a condition whose reconstructions are degenerate (flat, one image for all
        # inputs, black/saturated, grid artefacts, NaN) fails the run (exit code 1)
        "strict": False,
    },
}

# Watson-DFT's starting phase weights (e^-2 per bin, Czolbe et al.) make the phase term
# ~40× the amplitude term on the demo's 32×32 [0, 1] patches (≈119 vs ≈3 for a
# mean-colour prediction), and the phase of near-zero coefficients (flat regions) is
# unlearnable noise: an autoencoder trained on it stays flat. e^-5 puts the two terms
# on the same scale at the start (≈6 vs ≈3). Czolbe et al. never trained with the
# starting values: their generators used parameters fitted to BAPPS. See
# docs/generation.md ("Why the demo preset looks the way it does").
DEMO_WATSON_PHASE_WEIGHT = math.exp(-5)

# the paper presets' conditions: the six losses, identical otherwise. Watson with Czolbe
# et al.'s shift augmentation (a random 0–7 px offset of the 8×8 block grid per batch, as
# in their training code): on a fixed grid the DFT model lets block-periodic patterns
# through (an 8-px grid of dots)
PAPER_CONDITIONS: list[Any] = [
    "l2",
    "ssim",
    "msssim",
    {"loss": "watson-dct", "loss_options": {"shift_augment": True}},
    {"loss": "watson-dft", "loss_options": {"shift_augment": True}},
    "deep",
]

PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a laptop CPU: tests and CI end to end
    "smoke": {
        "name": "smoke",
        "data": {"image_size": 32, "n_test": 4, "train_patches": 256},
        "model": {"latent": 16, "width": 8},
        "train": {"steps": 40, "batch_size": 16, "checkpoint_every": 20, "lr": 2e-3},
        "conditions": ["l1", "l2"],
        "evaluate": {"metrics": ["l1", "l2"]},
        "contact_sheet": {"columns": 4, "scale": 2},
    },
    # every condition on 2 CPU cores in about five minutes (see docs/generation.md):
    # resize-convolution decoder (no checkerboards under the deep loss) and Watson-DFT
    # from Czolbe's published starting values with the phase weights lowered from e^-2 to
    # DEMO_WATSON_PHASE_WEIGHT (as measured; the calibrated default set came later)
    "demo": {
        "name": "demo",
        "data": {"image_size": 32, "n_test": 12, "train_patches": 4096},
        "model": {"latent": 64, "width": 16, "upsample": "nearest"},
        "train": {"steps": 800, "batch_size": 32, "checkpoint_every": 200, "lr": 2e-3},
        "conditions": [
            "l1",
            "l2",
            "ssim",
            "msssim",
            {
                "loss": "watson-dft",
                "loss_options": {"start": "published", "phase_weight": DEMO_WATSON_PHASE_WEIGHT},
            },
            "deep",
        ],
    },
    # Czolbe et al.'s CelebA setting: 64×64 VAE, latent 256, batch 64, Adam 1e-4 halved
    # regularly. Every condition trained to the same rate (kl_target nats per image, a
    # Lagrange multiplier instead of per-loss weights), resize-convolution decoder (no
    # checkerboards under any loss), Watson with its calibrated starting parameters and
    # Czolbe's shift augmentation; a degenerate condition fails the run (guard.strict).
    "paper": {
        "name": "paper",
        "data": {"image_size": 64, "n_test": 16, "train_patches": 65536},
        "model": {"architecture": "vae", "latent": 256, "width": 64, "upsample": "nearest"},
        "train": {
            "steps": 100000,
            "batch_size": 64,
            "lr": 1e-4,
            "lr_halve_every": 20000,
            "checkpoint_every": 2000,
            "kl_target": 800.0,  # nats per 64×64 image: ≈ 0.2 nats per pixel
        },
        "conditions": PAPER_CONDITIONS,
        "guard": {"strict": True},
    },
    # the paper preset's shape at CPU size (2 cores, a few minutes): VAE, equal rate
    # (the same nats per pixel as paper), resize-conv decoder, the same six conditions
    "paper-cpu": {
        "name": "paper-cpu",
        "data": {"image_size": 32, "n_test": 12, "train_patches": 4096},
        "model": {"architecture": "vae", "latent": 128, "width": 16, "upsample": "nearest"},
        "train": {
            "steps": 600,
            "batch_size": 16,
            "lr": 2e-3,
            "checkpoint_every": 200,
            "kl_target": 200.0,  # nats per 32×32 image: ~0.2 nats per pixel
        },
        "conditions": PAPER_CONDITIONS,
        "contact_sheet": {"columns": 12, "scale": 3},
        "guard": {"strict": True},
    },
}

# settings that choose how the work is spread over processes, not what is computed: the
# same for every condition, left out of conditions and of config_sha256
EXECUTION_KEYS = {"train": ("distribute",)}
DISTRIBUTE = ("conditions", "data")

# keys a condition mapping may carry; model/train keys override the global ones
CONDITION_KEYS = {
    "name",
    "loss",
    "loss_options",  # keyword options of a single registered loss, e.g. {phase_weight: 0.01}
    "architecture",
    "latent",
    "width",
    "upsample",
    *(key for key in DEFAULTS["train"] if key not in EXECUTION_KEYS["train"]),
}
CONDITION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class ConfigError(ValueError):
    """A configuration problem a user can fix (message names the key and the fix)."""


def _suggest(key: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _merge(base: dict[str, Any], update: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Recursive merge of ``update`` into a copy of ``base``; unknown keys raise."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{where}{key}"
        if key not in base:
            raise ConfigError(
                f"unknown configuration key {dotted!r}{_suggest(str(key), base)}; "
                f"valid keys here: {', '.join(sorted(base))}"
            )
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted!r} must be a mapping of {', '.join(sorted(base[key]))}")
            merged[key] = _merge(base[key], value, f"{dotted}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _yaml_numbers(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; read it as the number it means."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {key: _yaml_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_yaml_numbers(item) for item in value]
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) configuration file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = _yaml_numbers(yaml.safe_load(text) or {})
        else:
            raise ConfigError(f"configuration file {str(path)!r} must end in .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot parse {str(path)!r}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping of settings at the top level")
    return data


def parse_override(text: str) -> dict[str, Any]:
    """``"train.steps=200"`` → ``{"train": {"steps": 200}}`` (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.steps=200")
    try:
        value = _yaml_numbers(yaml.safe_load(raw)) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def condition_name(loss: str) -> str:
    """A folder-safe condition name for a loss spec: ``'l2:1,deep:0.1'`` → ``'l2-1+deep-0.1'``."""
    return re.sub(r"[^A-Za-z0-9._+-]", "-", loss.replace(",", "+").replace(":", "-"))


def _check_number(value: Any, key: str, *, integer: bool, minimum: float) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {what} >= {minimum:g}, got {value!r}")


def _normalise_conditions(config: dict[str, Any]) -> list[dict[str, Any]]:
    raw = config["conditions"]
    if isinstance(raw, str):
        raw = [part for part in raw.split(";") if part.strip()] if ";" in raw else [raw]
    if not isinstance(raw, list) or not raw:
        raise ConfigError("conditions must be a non-empty list of loss names or mappings")
    conditions = []
    for entry in raw:
        if isinstance(entry, str):
            entry = {"loss": entry.strip()}
        if not isinstance(entry, Mapping) or "loss" not in entry:
            raise ConfigError(
                f"condition {entry!r} must be a loss name or a mapping with a 'loss' key"
            )
        unknown = sorted(set(entry) - CONDITION_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(unknown)} in condition {dict(entry)!r}"
                f"{_suggest(unknown[0], CONDITION_KEYS)}; valid: {', '.join(sorted(CONDITION_KEYS))}"
            )
        loss = entry["loss"]
        if not isinstance(loss, str) or not loss.strip():
            raise ConfigError(f"condition loss must be a loss name or spec string, got {loss!r}")
        condition = {
            "name": str(entry.get("name") or condition_name(loss.strip())),
            "loss": loss.strip(),
            "architecture": entry.get("architecture", config["model"]["architecture"]),
            "latent": entry.get("latent", config["model"]["latent"]),
            "width": entry.get("width", config["model"]["width"]),
            "upsample": entry.get("upsample", config["model"]["upsample"]),
            "loss_options": copy.deepcopy(entry.get("loss_options", {})),
        }
        for key in DEFAULTS["train"]:
            if key not in EXECUTION_KEYS["train"]:
                condition[key] = entry.get(key, config["train"][key])
        conditions.append(condition)
    names = [c["name"] for c in conditions]
    for name in names:
        if not CONDITION_NAME.match(name) or name == "reference":
            raise ConfigError(
                f"condition name {name!r} is not usable as a folder name; use letters, digits, "
                "'.', '_', '+', '-' (and not 'reference')"
            )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"condition name(s) {', '.join(duplicates)} appear twice; give each a name"
        )
    return conditions


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check types and ranges; return the config with ``conditions`` fully populated."""
    config = copy.deepcopy(config)
    data, model, train = config["data"], config["model"], config["train"]
    if not isinstance(config["name"], str) or not CONDITION_NAME.match(config["name"]):
        raise ConfigError(f"name must be a short folder-safe string, got {config['name']!r}")
    _check_number(config["seed"], "seed", integer=True, minimum=0)
    if not isinstance(data["source"], str) or not data["source"]:
        raise ConfigError("data.source must be 'skimage' or the path of an image folder")
    _check_number(data["image_size"], "data.image_size", integer=True, minimum=8)
    if data["channels"] not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, got {data['channels']!r}")
    box = data["crop_box"]
    if box is not None and (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in box)
        or box[0] < 0
        or box[1] < 0
        or box[2] <= box[0]
        or box[3] <= box[1]
    ):
        raise ConfigError(
            f"data.crop_box must be [left, top, right, bottom] integers with right > left and "
            f"bottom > top (e.g. CelebA [25, 45, 153, 178]), got {box!r}"
        )
    fraction = data["test_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"data.test_fraction must be between 0 and 1, got {fraction!r}")
    _check_number(data["n_test"], "data.n_test", integer=True, minimum=1)
    _check_number(data["train_patches"], "data.train_patches", integer=True, minimum=1)
    _check_number(data["patch_scale"], "data.patch_scale", integer=False, minimum=1)
    metrics = config["evaluate"]["metrics"]
    if metrics != "all" and (
        not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics)
    ):
        raise ConfigError(f"evaluate.metrics must be 'all' or a list of names, got {metrics!r}")
    _check_number(
        config["contact_sheet"]["columns"], "contact_sheet.columns", integer=True, minimum=1
    )
    _check_number(config["contact_sheet"]["scale"], "contact_sheet.scale", integer=True, minimum=1)
    # model/train keys are checked per condition (conditions may override them)
    config["model"], config["train"] = model, train
    conditions = _normalise_conditions(config)
    for condition in conditions:
        where = f"condition {condition['name']!r}"
        if condition["architecture"] not in ARCHITECTURES:
            raise ConfigError(
                f"{where}: architecture must be one of {', '.join(ARCHITECTURES)}, "
                f"got {condition['architecture']!r}"
            )
        if condition["upsample"] not in UPSAMPLING:
            raise ConfigError(
                f"{where}: upsample must be one of {', '.join(UPSAMPLING)}, "
                f"got {condition['upsample']!r}"
            )
        options = condition["loss_options"]
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise ConfigError(
                f"{where}: loss_options must be a mapping of option names to values, e.g. "
                f"{{phase_weight: 0.01}}, got {options!r}"
            )
        if options and ("," in condition["loss"] or ":" in condition["loss"]):
            raise ConfigError(
                f"{where}: loss_options apply to a single loss name, not to the composite "
                f"spec {condition['loss']!r}"
            )
        for key in ("latent", "width", "steps", "batch_size", "checkpoint_every"):
            _check_number(condition[key], f"{where}: {key}", integer=True, minimum=1)
        _check_number(
            condition["lr_halve_every"], f"{where}: lr_halve_every", integer=True, minimum=0
        )
        _check_number(condition["num_workers"], f"{where}: num_workers", integer=True, minimum=-1)
        for key in ("lr", "recon_weight", "adversarial_weight"):
            _check_number(condition[key], f"{where}: {key}", integer=False, minimum=0)
        if condition["lr"] <= 0:
            raise ConfigError(f"{where}: lr must be > 0, got {condition['lr']!r}")
        _check_rate(condition, where)
    if train["distribute"] not in DISTRIBUTE:
        raise ConfigError(
            f"train.distribute must be one of {', '.join(DISTRIBUTE)} (how torchrun's processes "
            f"share the work), got {train['distribute']!r}"
        )
    if not isinstance(config["guard"]["strict"], bool):
        raise ConfigError(f"guard.strict must be true or false, got {config['guard']['strict']!r}")
    config["conditions"] = conditions
    return config


def _check_rate(condition: dict[str, Any], where: str) -> None:
    """The rate-constraint keys: kl_target null or > 0 (VAE only), multiplier settings."""
    _check_number(condition["kl_dual_lr"], f"{where}: kl_dual_lr", integer=False, minimum=0)
    beta = condition["kl_beta_init"]
    _check_number(beta, f"{where}: kl_beta_init", integer=False, minimum=0)
    if beta <= 0:
        raise ConfigError(f"{where}: kl_beta_init must be > 0, got {beta!r}")
    target = condition["kl_target"]
    if target is None:
        return
    _check_number(target, f"{where}: kl_target", integer=False, minimum=0)
    if target <= 0:
        raise ConfigError(
            f"{where}: kl_target must be a number of nats > 0 (or null for the fixed "
            f"recon_weight objective), got {target!r}"
        )
    if condition["architecture"] != "vae":
        raise ConfigError(
            f"{where}: kl_target (a rate in nats) needs architecture vae, not "
            f"{condition['architecture']!r}; set train.kl_target=null for conv/fc models"
        )
    if condition["recon_weight"] != 1:
        raise ConfigError(
            f"{where}: recon_weight has no effect when kl_target is set (the rate constraint "
            "sets the balance between reconstruction and KL); remove it, or set "
            "train.kl_target=null to train with a fixed recon_weight"
        )


def resolve_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults ← preset ← file ← ``extra`` (CLI options) ← ``key=value`` overrides."""
    config = copy.deepcopy(DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(
                f"unknown preset {preset!r}{_suggest(preset, PRESETS)}; choose one of "
                f"{', '.join(PRESETS)}"
            )
        config = _merge(config, PRESETS[preset])
    if file is not None:
        config = _merge(config, load_config_file(file))
    if extra:
        config = _merge(config, extra)
    for text in overrides:
        config = _merge(config, parse_override(text))
    return validate_config(config)


def select_conditions(config: dict[str, Any], names: str | None) -> dict[str, Any]:
    """``config`` with only the conditions named in ``names`` (comma-separated, config
    order kept); all of them when ``names`` is empty or None."""
    if not names:
        return config
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    unknown = sorted(wanted - {c["name"] for c in config["conditions"]})
    if unknown:
        raise ConfigError(
            f"unknown condition(s) {', '.join(unknown)}; this configuration has "
            f"{', '.join(c['name'] for c in config['conditions'])}"
        )
    return {**config, "conditions": [c for c in config["conditions"] if c["name"] in wanted]}


def config_sha256(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``config`` (sorted keys, no whitespace), without
    the EXECUTION_KEYS (a set made with ``train.distribute=data`` is up to date for
    ``conditions`` too, as one made on CUDA is for the CPU)."""
    config = dict(config)
    for section, keys in EXECUTION_KEYS.items():
        if isinstance(config.get(section), Mapping):
            config[section] = {k: v for k, v in config[section].items() if k not in keys}
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
