"""generation: config, data, models, training, stimulus sets — real training on CPU.

End-to-end runs use a tiny configuration (``TINY``) so the whole file stays within its
time budget; every run really trains, reconstructs, evaluates and writes PNGs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from generation.config import ConfigError, config_sha256, resolve_config
from generation.data import (
    PHOTOS,
    DataError,
    bundled_photo,
    held_out_start,
    image_id,
    load_folder,
    skimage_patches,
)
from generation.losses import build_loss
from generation.models import build_model
from generation.pipeline import generate
from generation.stimulus_set import StimulusSetError, read_png, validate_stimulus_set
from generation.train import StepBatches, load_model, train_condition
from study_app.cli import main as pstudy

TINY = [
    "data.train_patches=96",
    "data.n_test=3",
    "model.width=4",
    "model.latent=8",
    "train.batch_size=8",
    "train.steps=24",
    "train.checkpoint_every=6",
    "conditions=[l1, l2]",
    "evaluate.metrics=[l1, l2]",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest (and identically in every process) on one thread; the
    suite shares 2 cores with other tests, where 2 spinning OpenMP threads crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _tiny(*extra: str) -> dict:
    return resolve_config("smoke", overrides=[*TINY, *extra])


def _stimulus_hashes(manifest: dict) -> dict[tuple[str, str], str]:
    return {(s["condition"], s["image_id"]): s["sha256"] for s in manifest["stimuli"]}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> tuple[Path, dict]:
    """One tiny stimulus set (two conditions × three images), shared by several tests."""
    out = tmp_path_factory.mktemp("sets") / "a"
    result = generate(_tiny(), out, device="cpu", progress=False)
    return out, result.manifest


# ----------------------------------------------------------------------------- config


def test_presets_file_and_overrides_layer_in_order(tmp_path):
    (tmp_path / "c.yaml").write_text("seed: 7\ntrain:\n  steps: 11\nconditions: [l2]\n")
    (tmp_path / "c.toml").write_text('seed = 7\nconditions = ["l2"]\n[train]\nsteps = 11\n')
    from_yaml = resolve_config("smoke", tmp_path / "c.yaml", ["train.lr=0.01"])
    from_toml = resolve_config("smoke", tmp_path / "c.toml", ["train.lr=0.01"])
    assert from_yaml == from_toml
    assert config_sha256(from_yaml) == config_sha256(from_toml)
    assert from_yaml["seed"] == 7 and from_yaml["train"]["steps"] == 11
    (condition,) = from_yaml["conditions"]
    assert condition["name"] == "l2" and condition["steps"] == 11 and condition["lr"] == 0.01
    assert condition["latent"] == 16  # from the smoke preset
    named = resolve_config("smoke", overrides=['conditions=[{loss: "l2:1,l1:0.5", steps: 3}]'])
    assert named["conditions"][0]["name"] == "l2-1+l1-0.5"
    assert named["conditions"][0]["steps"] == 3


def test_scientific_notation_is_a_number_in_overrides_and_yaml_files(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as a string; a learning rate written so must work."""
    (tmp_path / "c.yaml").write_text("conditions: [l2]\ntrain:\n  lr: 3e-4\n")
    from_file = resolve_config("smoke", tmp_path / "c.yaml")
    assert from_file["conditions"][0]["lr"] == pytest.approx(3e-4)
    overridden = resolve_config("smoke", overrides=["train.lr=1e-4", "data.source=1e5x"])
    assert overridden["conditions"][0]["lr"] == pytest.approx(1e-4)
    assert overridden["data"]["source"] == "1e5x"  # only whole numbers are converted


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stepz=3"], "did you mean 'steps'"),
        (["trian.steps=3"], "did you mean 'train'"),
        (["train.steps=-1"], "steps must be an integer >= 1"),
        (["data.channels=2"], "data.channels must be 1 or 3"),
        (["model.architecture=gan"], "architecture must be one of conv, fc, vae"),
        (["conditions=[{loss: l2, lern_rate: 1}]"], "lern_rate"),
        (["data.crop_box=[10, 10, 5, 5]"], "crop_box"),
        (["model.upsample=bilinear"], "upsample must be one of transpose, nearest"),
        (["conditions=[{loss: l2, loss_options: 3}]"], "loss_options must be a mapping"),
        (
            ['conditions=[{loss: "l2:1,l1:1", loss_options: {a: 1}}]'],
            "loss_options apply to a single loss name",
        ),
        (["seed"], "key=value"),
    ],
)
def test_bad_configuration_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        resolve_config("smoke", overrides=overrides)


def test_every_preset_resolves_to_registered_losses():
    from generation.losses import parse_spec

    demo = resolve_config("demo")
    assert [c["loss"] for c in demo["conditions"]] == [
        "l1",
        "l2",
        "ssim",
        "msssim",
        "watson-dft",
        "deep",
    ]
    paper = resolve_config("paper")
    assert paper["data"]["image_size"] == 64 and paper["model"]["architecture"] == "vae"
    for preset in ("smoke", "demo", "paper", "paper-cpu"):
        for condition in resolve_config(preset)["conditions"]:
            assert parse_spec(condition["loss"])


@pytest.mark.parametrize("preset", ["paper", "paper-cpu"])
def test_paper_presets_differ_only_in_the_loss_and_train_at_equal_rate(preset):
    config = resolve_config(preset)
    assert [c["loss"] for c in config["conditions"]] == [
        "l2", "ssim", "msssim", "watson-dct", "watson-dft", "deep"
    ]
    assert config["guard"]["strict"] is True
    shared = {
        key: {json.dumps(c[key], sort_keys=True) for c in config["conditions"]}
        for key in config["conditions"][0]
        if key not in ("name", "loss", "loss_options")
    }
    assert all(len(values) == 1 for values in shared.values()), shared
    first = config["conditions"][0]
    assert first["architecture"] == "vae" and first["upsample"] == "nearest"
    assert first["kl_target"] > 0 and first["recon_weight"] == 1
    pixels = config["data"]["image_size"] ** 2
    assert first["kl_target"] / pixels == pytest.approx(800 / 64**2)  # same rate per pixel
    for c in config["conditions"]:
        if c["loss"].startswith("watson"):  # calibrated start (the default), shifted grid
            assert c["loss_options"] == {"shift_augment": True}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.architecture=conv", "train.kl_target=100"], "kl_target .* needs architecture vae"),
        (["model.architecture=vae", "train.kl_target=0"], "kl_target must be a number of nats > 0"),
        (
            ["model.architecture=vae", "train.kl_target=100", "train.recon_weight=5"],
            "recon_weight has no effect when kl_target is set",
        ),
        (["train.kl_beta_init=0"], "kl_beta_init must be > 0"),
        (["guard.strict=maybe"], "guard.strict must be true or false"),
    ],
)
def test_bad_rate_and_guard_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("smoke", overrides=overrides)


def test_conditions_carry_loss_options_and_upsampling():
    config = resolve_config(
        "smoke",
        overrides=[
            "model.upsample=nearest",
            "conditions=[l2, {loss: watson-dft, loss_options: {phase_weight: 0.01}, "
            "upsample: transpose}]",
        ],
    )
    l2, watson = config["conditions"]
    assert (l2["upsample"], l2["loss_options"]) == ("nearest", {})
    assert watson["name"] == "watson-dft" and watson["upsample"] == "transpose"
    assert watson["loss_options"] == {"phase_weight": 0.01}


def test_demo_preset_regressions_checkerboards_and_flat_watson_dft():
    """The demo's ``deep`` condition showed checkerboards (transposed-conv decoder; the
    deep loss does not see them) and ``watson-dft`` learned one flat image for every input:
    with the starting phase weights e^-2 the phase term is ~25× the amplitude term."""
    demo = resolve_config("demo")
    for condition in demo["conditions"]:
        model = build_model(
            condition["architecture"],
            channels=3,
            size=32,
            latent=condition["latent"],
            width=condition["width"],
            upsample=condition["upsample"],
        )
        assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
    (watson,) = [c for c in demo["conditions"] if c["loss"] == "watson-dft"]
    x = skimage_patches(size=32, channels=3, seed=0, n_train=1, n_test=8).test.images / 255.0
    flat = x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()  # mean colour only
    assert watson["loss_options"]["start"] == "published"  # as measured for the demo
    with torch.no_grad():
        total = build_loss("watson-dft", **watson["loss_options"])(flat, x).mean()
        amplitude = build_loss("watson-dft", start="published", phase_weight=1e-30)(flat, x).mean()
        default = build_loss("watson-dft", start="published")(flat, x).mean()
    phase = total - amplitude
    assert float(default - amplitude) > 20 * float(amplitude)  # ≈119 vs ≈3: why it failed
    assert 0.5 * float(amplitude) < float(phase) < 3 * float(amplitude)  # ≈6 vs ≈3


def test_unknown_preset_and_unparsable_file(tmp_path):
    with pytest.raises(ConfigError, match="choose one of"):
        resolve_config("smok")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        resolve_config("smoke", tmp_path / "bad.yaml")


# ----------------------------------------------------------------------------- data


def _write_images(folder: Path, count: int, size: tuple[int, int] = (40, 30)) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        sub = folder / ("grey" if index % 3 == 0 else "colour")
        sub.mkdir(parents=True, exist_ok=True)
        if index % 3 == 0:
            Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)).save(
                sub / f"img {index}.png"
            )
        else:
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
                sub / f"img{index}.jpg", quality=95
            )


def test_folder_split_is_seeded_disjoint_and_cropped(tmp_path):
    _write_images(tmp_path, 20)
    a = load_folder(tmp_path, size=16, channels=3, seed=1, test_fraction=0.25, n_test=3)
    b = load_folder(tmp_path, size=16, channels=3, seed=1, test_fraction=0.25, n_test=3)
    c = load_folder(tmp_path, size=16, channels=3, seed=2, test_fraction=0.25, n_test=3)
    assert a.test.ids == b.test.ids and torch.equal(a.test.images, b.test.images)
    assert a.test.ids != c.test.ids
    train_ids = {image_id(e.relative) for e in a.train.entries}
    assert len(train_ids) == 15 and not train_ids & set(a.test.ids)
    assert a.test.images.shape == (3, 3, 16, 16) and a.test.images.dtype == torch.uint8
    assert a.train[0].shape == (3, 16, 16)
    assert all(i.replace("__", "/").split("/")[0] in ("grey", "colour") for i in a.test.ids)
    assert a.input_sha256 == b.input_sha256
    # crop box then resize: the crop of a known image, resized
    box_split = load_folder(
        tmp_path, size=8, channels=1, seed=1, test_fraction=0.25, n_test=1, crop_box=[2, 4, 18, 20]
    )
    relative = box_split.train.entries[0].relative
    with Image.open(tmp_path / relative) as image:
        expected = np.asarray(
            image.convert("L")
            .crop((2, 4, 18, 20))
            .resize((8, 8), Image.Resampling.LANCZOS, reducing_gap=None)
        )
    assert np.array_equal(box_split.train[0][0].numpy(), expected)


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope", size=16, channels=3, seed=0, test_fraction=0.2, n_test=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        load_folder(tmp_path / "empty", size=16, channels=3, seed=0, test_fraction=0.2, n_test=1)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable"):
        load_folder(tmp_path / "broken", size=16, channels=3, seed=0, test_fraction=0.2, n_test=1)
    _write_images(tmp_path / "small", 4, size=(12, 20))
    with pytest.raises(DataError, match=r"smaller than the model size 16×16"):
        load_folder(tmp_path / "small", size=16, channels=3, seed=0, test_fraction=0.2, n_test=1)


def test_skimage_test_patches_come_from_held_out_strips():
    split = skimage_patches(size=32, channels=3, seed=0, n_train=64, n_test=6)
    assert split.test.images.shape == (6, 3, 32, 32) and len(split.train) == 64
    import skimage.data

    for patch_id, patch in zip(split.test.ids, split.test.images, strict=True):
        name, top, left = patch_id.split("-")
        assert name in PHOTOS
        photo = bundled_photo(name, 3, 32, 4.0)
        assert left_of_strip(photo) <= int(left)  # inside the held-out strip
        assert np.array_equal(
            patch.numpy(),
            photo[int(top) : int(top) + 32, int(left) : int(left) + 32].transpose(2, 0, 1),
        )
    # no training patch contains pixels of a test patch: every training patch is found
    # inside the training region of some photo (at one of the two scales)
    regions = [
        bundled_photo(name, 3, 32, scale)[:, : left_of_strip(bundled_photo(name, 3, 32, scale))]
        for name in PHOTOS
        for scale in (4.0, 8.0)
    ]
    for patch in split.train.images[:16]:
        variants = (patch, patch.flip(-1))
        assert any(_inside(v.numpy().transpose(1, 2, 0), r) for v in variants for r in regions)
    again = skimage_patches(size=32, channels=3, seed=0, n_train=64, n_test=6)
    assert torch.equal(split.train.images, again.train.images)
    assert split.input_sha256 == again.input_sha256
    grey = skimage_patches(size=32, channels=1, seed=0, n_train=8, n_test=2)
    assert grey.test.images.shape == (2, 1, 32, 32)
    assert skimage.data.astronaut().shape[2] == 3


def _inside(patch: np.ndarray, region: np.ndarray) -> bool:
    """Whether the H×W×C ``patch`` occurs verbatim somewhere in ``region``."""
    first = patch[0].tobytes()
    channels = region.shape[2]
    for top in range(region.shape[0] - patch.shape[0] + 1):
        row = region[top].tobytes()
        position = row.find(first)
        while position != -1:
            if position % channels == 0:
                left = position // channels
                window = region[top : top + patch.shape[0], left : left + patch.shape[1]]
                if window.shape == patch.shape and np.array_equal(window, patch):
                    return True
            position = row.find(first, position + 1)
    return False


def left_of_strip(photo: np.ndarray) -> int:
    return held_out_start(photo.shape[1], 32, 0.2)


def test_step_batches_resume_and_shard_the_same_global_batches():
    full = list(StepBatches(10, 4, steps=7, seed=3))
    assert list(StepBatches(10, 4, steps=7, seed=3, start=4)) == full[4:]
    ranks = [list(StepBatches(10, 4, steps=7, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    for step, batch in enumerate(full):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)
    # every epoch is a permutation: each item seen once per 10 positions
    flat = [i for batch in full for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("upsample", ["transpose", "nearest"])
@pytest.mark.parametrize("architecture", ["conv", "fc", "vae"])
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 48)])
def test_models_reconstruct_in_range_and_learn(architecture, channels, size, upsample):
    torch.manual_seed(0)
    model = build_model(
        architecture, channels=channels, size=size, latent=8, width=4, upsample=upsample
    )
    transposed = any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
    assert transposed == (upsample == "transpose" and architecture != "fc")
    x = torch.rand(2, channels, size, size, requires_grad=False)
    out = model(x, torch.Generator().manual_seed(0))
    assert out.images.shape == x.shape
    assert float(out.images.detach().min()) >= 0 and float(out.images.detach().max()) <= 1
    assert (out.kl is not None) == (architecture == "vae")
    if out.kl is not None:
        assert out.kl.shape == (2,) and bool((out.kl >= 0).all())
    out.images.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert torch.equal(model.reconstruct(x), model.reconstruct(x))


def test_unknown_upsampling_is_refused():
    with pytest.raises(ValueError, match="upsample must be one of transpose, nearest"):
        build_model("conv", channels=3, size=32, latent=8, width=4, upsample="bilinear")


def test_checkpoints_without_upsample_key_still_load(tmp_path):
    """model.pt files written before ``upsample`` existed hold transposed-conv decoders."""
    torch.manual_seed(0)
    model = build_model("conv", channels=3, size=32, latent=8, width=4)
    condition = {"architecture": "conv", "latent": 8, "width": 4}
    state = {"condition": condition, "channels": 3, "size": 32, "model": model.state_dict()}
    torch.save(state, tmp_path / "model.pt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(load_model(tmp_path / "model.pt").reconstruct(x), model.reconstruct(x))


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_lowers_the_loss_on_held_out_images(tmp_path):
    config = _tiny("train.steps=120", "train.batch_size=16", "model.width=8", "model.latent=32")
    condition = next(c for c in config["conditions"] if c["name"] == "l2")
    split = skimage_patches(size=32, channels=3, seed=0, n_train=512, n_test=8)
    result = train_condition(
        condition,
        split.train,
        channels=3,
        size=32,
        seed=0,
        fingerprint="f",
        checkpoint_dir=tmp_path,
        device=torch.device("cpu"),
        progress=False,
    )
    x = split.test.images.float() / 255
    torch.manual_seed(0)
    untrained = build_model("conv", channels=3, size=32, latent=32, width=8).eval()
    trained = load_model(result.model_path)
    l2 = build_loss("l2")
    with torch.no_grad():
        before = float(l2(untrained.reconstruct(x), x).mean())
        after = float(l2(trained.reconstruct(x), x).mean())
    flat = float(((x - x.mean(dim=(2, 3), keepdim=True)) ** 2).mean())
    assert after < 0.8 * before, (before, after, flat)
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:5])


def test_vae_with_adversarial_term_trains(tmp_path):
    config = _tiny(
        "model.architecture=vae", "train.adversarial_weight=0.1", "train.steps=8", "conditions=[l2]"
    )
    split = skimage_patches(size=32, channels=3, seed=0, n_train=32, n_test=1)
    result = train_condition(
        config["conditions"][0],
        split.train,
        channels=3,
        size=32,
        seed=0,
        fingerprint="f",
        checkpoint_dir=tmp_path,
        device=torch.device("cpu"),
        progress=False,
    )
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "disc" in state and state["step"] == 8 and state["done"]
    assert len(result.losses) == 8 and all(np.isfinite(result.losses))


# ----------------------------------------------------------------------------- stimulus sets


def test_stimulus_set_is_complete_and_hashes_match(tiny_set):
    out, manifest = tiny_set
    assert validate_stimulus_set(out) == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "pstudy-stimulus-set" and manifest["format_version"] == 1
    assert manifest["image_size"] == [32, 32] and manifest["channels"] == 3
    ids = [image["id"] for image in manifest["images"]]
    names = [c["name"] for c in manifest["conditions"]]
    assert names == ["l1", "l2"] and len(ids) == 3
    assert {(s["condition"], s["image_id"]) for s in manifest["stimuli"]} == {
        (c, i) for c in names for i in ids
    }
    provenance = manifest["provenance"]
    assert provenance["config_sha256"] == config_sha256(provenance["config"])
    assert provenance["seed"] == 0 and "torch" in provenance["package_versions"]
    assert set(provenance) >= {"git_commit", "input_sha256"}
    for condition in manifest["conditions"]:
        model = out.with_name("a.checkpoints") / condition["name"] / "model.pt"
        import hashlib

        assert hashlib.sha256(model.read_bytes()).hexdigest() == condition["checkpoint_sha256"]
    # metrics recomputed independently from the PNG files
    from skimage.metrics import peak_signal_noise_ratio

    for stimulus in manifest["stimuli"]:
        ref = read_png(out / "reference" / f"{stimulus['image_id']}.png").numpy() / 255
        img = read_png(out / stimulus["path"]).numpy() / 255
        assert stimulus["metrics"]["l2"] == pytest.approx(np.mean((img - ref) ** 2), rel=1e-5)
        assert stimulus["metrics"]["l1"] == pytest.approx(np.mean(np.abs(img - ref)), rel=1e-5)
        assert stimulus["metrics"]["psnr"] == pytest.approx(
            peak_signal_noise_ratio(ref, img, data_range=1), rel=1e-5
        )
    import pandas as pd

    table = pd.read_csv(out / "evaluation.csv").set_index("condition")
    for condition in manifest["conditions"]:
        for metric, value in condition["metrics"].items():
            per = [
                s["metrics"][metric]
                for s in manifest["stimuli"]
                if s["condition"] == condition["name"]
            ]
            assert (
                value
                == pytest.approx(np.mean(per))
                == pytest.approx(table.loc[condition["name"], metric])
            )


def test_contact_sheet_shows_reference_row_then_conditions(tiny_set):
    out, manifest = tiny_set
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    scale = 2  # smoke preset
    ref = read_png(out / manifest["images"][0]["path"]).numpy().transpose(1, 2, 0)
    big = np.repeat(np.repeat(ref, scale, 0), scale, 1)
    # find the reference tile: it is in the sheet exactly once
    h, w = big.shape[:2]
    hits = [
        (y, x)
        for y in range(sheet.shape[0] - h + 1)
        for x in range(sheet.shape[1] - w + 1)
        if np.array_equal(sheet[y, x : x + w], big[0])
        and np.array_equal(sheet[y : y + h, x : x + w], big)
    ]
    assert len(hits) == 1
    rows = 1 + len(manifest["conditions"])
    assert sheet.shape[0] >= rows * h and sheet.shape[1] >= 3 * w


def test_validation_catches_tampering_and_missing_files(tiny_set, tmp_path):
    import shutil

    out, manifest = tiny_set
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stimulus = manifest["stimuli"][0]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(copy / stimulus["path"])
    (copy / manifest["stimuli"][1]["path"]).unlink()
    with pytest.raises(StimulusSetError) as caught:
        validate_stimulus_set(copy)
    text = str(caught.value)
    assert f"sha256 of {stimulus['path']} does not match" in text
    assert f"file {manifest['stimuli'][1]['path']} is missing" in text
    # without a manifest the layout alone is a stimulus set
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("manifest.json", "*.csv"))
    inferred = validate_stimulus_set(bare)
    assert [c["name"] for c in inferred["conditions"]] == ["l1", "l2"]
    assert _stimulus_hashes(inferred) == _stimulus_hashes(manifest)


@pytest.mark.slow
def test_same_seed_same_stimuli_and_reuse_skips(tiny_set, tmp_path):
    out, manifest = tiny_set
    again = generate(_tiny(), tmp_path / "b", device="cpu", progress=False).manifest
    assert _stimulus_hashes(again) == _stimulus_hashes(manifest)
    assert [c["checkpoint_sha256"] for c in again["conditions"]] == [
        c["checkpoint_sha256"] for c in manifest["conditions"]
    ]
    other = generate(_tiny("seed=1"), tmp_path / "c", device="cpu", progress=False).manifest
    assert set(_stimulus_hashes(other).values()) != set(_stimulus_hashes(manifest).values())
    before = (tmp_path / "b" / "manifest.json").read_text()
    reused = generate(_tiny(), tmp_path / "b", device="cpu", progress=False)
    assert reused.reused and reused.training == {}
    assert (tmp_path / "b" / "manifest.json").read_text() == before
    # a changed config regenerates the set in place (old condition folders removed)
    changed = generate(_tiny("conditions=[l1]"), tmp_path / "b", device="cpu", progress=False)
    assert not changed.reused and not (tmp_path / "b" / "l2").exists()


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_uninterrupted_result(tiny_set, tmp_path):
    out, manifest = tiny_set
    # steps long enough that the kill lands mid-training; same config as the tiny set
    # except steps, so compare against a fresh uninterrupted run in-process
    extra = ["train.steps=60", "train.checkpoint_every=10", "conditions=[l2]"]
    command = [
        sys.executable,
        "-m",
        "generation",
        "--preset",
        "smoke",
        "--quiet",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "killed"),
    ]
    for item in [*TINY, *extra]:
        command += ["--set", item]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env()
    )
    last = tmp_path / "killed.checkpoints" / "l2" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert last.exists(), process.stderr.read().decode()
    interrupted_at = torch.load(last, weights_only=True)["step"]
    assert 0 < interrupted_at < 60
    assert not (tmp_path / "killed" / "manifest.json").exists()
    resumed = generate(
        _tiny(*extra), tmp_path / "killed", device="cpu", resume=True, progress=False
    )
    assert resumed.manifest["provenance"]["training"]["l2"]["resumed_from_step"] >= interrupted_at
    straight = generate(_tiny(*extra), tmp_path / "straight", device="cpu", progress=False)
    assert _stimulus_hashes(resumed.manifest) == _stimulus_hashes(straight.manifest)
    assert resumed.training["l2"].losses == straight.training["l2"].losses


def test_ctrl_c_stops_training_promptly_with_a_resume_hint_and_no_traceback(tmp_path):
    command = [sys.executable, "-m", "generation", "--preset", "smoke", "--quiet", "--device",
               "cpu", "--out", str(tmp_path / "stopped")]
    for item in [*TINY, "train.steps=100000", "train.checkpoint_every=5", "conditions=[l2]"]:
        command += ["--set", item]
    process = subprocess.Popen(  # SIGINT as a terminal's Ctrl-C delivers it (not ignored)
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    last = tmp_path / "stopped.checkpoints" / "l2" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert time.monotonic() - sent < 30
    assert "Traceback" not in stderr
    assert "interrupted" in stderr and "--resume" in stderr and str(last.parent.parent) in stderr
    assert last.exists() and not (tmp_path / "stopped" / "manifest.json").exists()


@pytest.mark.slow
def test_torchrun_world_size_one_gloo_matches_a_plain_run(tiny_set, tmp_path):
    out, manifest = tiny_set
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "generation",
        "--preset",
        "smoke",
        "--quiet",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "ddp"),
    ]
    for item in TINY:
        command += ["--set", item]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert completed.returncode == 0, completed.stderr[-3000:]
    ddp = validate_stimulus_set(tmp_path / "ddp")
    assert ddp["provenance"]["distributed"] is True and ddp["provenance"]["world_size"] == 1
    assert _stimulus_hashes(ddp) == _stimulus_hashes(manifest)


# ----------------------------------------------------------------------------- CLI


def test_cli_help_shows_examples():
    result = CliRunner().invoke(pstudy, ["generate", "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "pstudy generate --preset smoke" in result.output
    assert "torchrun" in result.output


def test_cli_writes_a_set_and_reuses_it(tmp_path):
    args = [
        "generate",
        "--preset",
        "smoke",
        "--quiet",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "set"),
    ]
    for item in [*TINY, "train.steps=4", "conditions=[l2]"]:
        args += ["--set", item]
    first = CliRunner().invoke(pstudy, args)
    assert first.exit_code == 0, first.output
    assert "(written)" in first.output and "l2: PSNR" in first.output
    second = CliRunner().invoke(pstudy, args)
    assert second.exit_code == 0 and "(reused)" in second.output
    validate_stimulus_set(tmp_path / "set")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--data", "{tmp}/missing"], 1, "does not exist"),
        (["--data", "{tmp}/empty"], 1, "no image files"),
        (["--data", "{tmp}/small"], 1, "smaller than the model size 32×32"),
        (["--conditions", "l2,no-such-loss"], 2, "unknown loss 'no-such-loss'"),
        (["--set", "train.stepz=4"], 2, "did you mean 'steps'"),
        (["--set", "evaluate.metrics=[psnr, ssimm]"], 2, "unknown metric(s) ssimm"),
        (
            ["--set", "conditions=[{loss: watson-dft, loss_options: {phase_wieght: 1}}]"],
            2,
            "unknown option(s) phase_wieght",
        ),
        (["--config", "{tmp}/missing.yaml"], 2, "does not exist"),
        (["--out", "{tmp}/notes"], 1, "non-empty folder without manifest.json"),
    ],
)
def test_cli_bad_inputs_give_a_message_not_a_traceback(tmp_path, args, code, message):
    (tmp_path / "empty").mkdir()
    _write_images(tmp_path / "small", 3, size=(20, 20))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(
        pstudy,
        [
            "generate",
            "--preset",
            "smoke",
            "--quiet",
            "--device",
            "cpu",
            "--set",
            "train.steps=1",
            *args,
        ],
    )
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_the_study_app_imports_a_generated_set(app, tiny_set):
    """Contract 1 end to end: what generation writes, study_app reads (and verifies)."""
    from sqlalchemy import func, select

    from study_app.extensions import db
    from study_app.models import Stimulus
    from study_app.stimuli import import_stimulus_set

    out, manifest = tiny_set
    with app.app_context():
        imported = import_stimulus_set(out)
        count = db.session.scalar(
            select(func.count())
            .select_from(Stimulus)
            .where(Stimulus.stimulus_set_id == imported.id)
        )
        assert (imported.image_height, imported.image_width, imported.channels) == (32, 32, 3)
        assert not imported.manifest_inferred
        assert count == len(manifest["stimuli"]) == 6


@pytest.mark.gpu
def test_cuda_run_with_bf16_autocast_and_channels_last(tmp_path):
    """Where a GPU is present: the CUDA path (bf16, channels-last, pinned memory,
    workers) trains every architecture and writes a valid set."""
    for architecture in ("conv", "fc", "vae"):
        config = _tiny(f"model.architecture={architecture}", "train.num_workers=2")
        result = generate(config, tmp_path / architecture, device="cuda", progress=False)
        assert result.manifest["provenance"]["device"].startswith("cuda")
        validate_stimulus_set(tmp_path / architecture)
        assert all(np.isfinite(r.losses).all() for r in result.training.values())


# ----------------------------------------------------------------------------- equal rate


def test_rate_control_moves_beta_towards_the_target():
    from generation.train import RATE_KP, RateControl

    rate = RateControl(target=100.0, dual_lr=0.1, d0=2.0, log_beta=0.0)
    rate.update(300.0, 0, 10)  # far above: β rises (error clipped at +1)
    assert rate.log_beta == pytest.approx(0.1) and rate.beta == pytest.approx(np.exp(0.1 + RATE_KP))
    for step in range(1, 60):
        rate.update(10.0, step, 60)  # far below: β falls, the moving average follows
    assert rate.kl_ema < 20 and rate.beta < 0.1
    distance, kl = torch.tensor([1.0, 3.0]), torch.tensor([50.0, 150.0])
    torch.testing.assert_close(rate.objective(distance, kl), distance / 2 + rate.beta * kl / 100)
    summary = rate.summary([10.0] * 60)
    assert summary["kl_target"] == 100 and summary["final_kl_mean_last_10pct"] == 10
    assert summary["beta_min"] <= summary["final_beta"] <= summary["beta_max"]
    assert len(summary["trajectory"]) <= 22 and summary["zero_rate_distortion"] == 2.0
    json.dumps(summary, allow_nan=False)


def _rate_condition(*extra: str) -> dict:
    config = _tiny(
        "model.architecture=vae",
        "model.upsample=nearest",
        "model.width=8",
        "model.latent=32",
        "train.kl_target=40",
        "train.batch_size=16",
        "train.lr=0.005",
        *extra,
    )
    return config["conditions"][0]


@pytest.mark.slow
def test_vae_trains_to_the_target_rate_whatever_the_loss_scale(tmp_path):
    """l2 (a per-pixel mean, ~0.01) and l2 × 10⁴ end at the same KL: the multiplier
    absorbs the scale, which a fixed recon_weight does not."""
    split = skimage_patches(size=32, channels=3, seed=0, n_train=512, n_test=8)
    finals = {}
    for name, loss in (("small", "l2"), ("large", "l2:10000")):
        condition = _rate_condition("train.steps=150", f"conditions=[{{loss: '{loss}'}}]")
        result = train_condition(
            condition, split.train, channels=3, size=32, seed=0, fingerprint="f",
            checkpoint_dir=tmp_path / name, device=torch.device("cpu"), progress=False,
        )
        assert len(result.kl) == 150 and result.rate is not None
        finals[name] = result.rate
        tail = np.mean(result.kl[-15:])
        assert tail == pytest.approx(40, rel=0.25), (name, tail, result.rate["trajectory"])
    # the multiplier is dimensionless (distances divided by their zero-rate value)
    assert finals["large"]["zero_rate_distortion"] == pytest.approx(
        1e4 * finals["small"]["zero_rate_distortion"], rel=1e-5
    )


def test_rate_state_and_shift_augmentation_resume_exactly(tmp_path):
    """A run resumed from a checkpoint continues the multiplier, the KL average and the
    global RNG (Watson's shift augmentation) where they were."""
    split = skimage_patches(size=32, channels=3, seed=0, n_train=64, n_test=1)
    conditions = "conditions=[{loss: watson-dct, loss_options: {shift_augment: true}}]"
    common = dict(channels=3, size=32, seed=0, fingerprint="f", device=torch.device("cpu"),
                  progress=False)
    straight = train_condition(
        _rate_condition("train.steps=12", conditions), split.train,
        checkpoint_dir=tmp_path / "straight", **common,
    )
    train_condition(
        _rate_condition("train.steps=6", conditions), split.train,
        checkpoint_dir=tmp_path / "resumed", **common,
    )
    last = tmp_path / "resumed" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["done"] = False  # as if stopped at step 6 of 12
    torch.save(state, last)
    torch.manual_seed(123)  # the resumed run must not depend on the RNG it starts with
    resumed = train_condition(
        _rate_condition("train.steps=12", conditions), split.train,
        checkpoint_dir=tmp_path / "resumed", resume=True, **common,
    )
    assert resumed.start_step == 6
    assert resumed.losses == straight.losses and resumed.kl == straight.kl
    assert resumed.rate["final_beta"] == straight.rate["final_beta"]


def test_manifest_and_evaluation_record_the_rate(tmp_path):
    config = _tiny(
        "model.architecture=vae", "train.kl_target=30", "train.steps=6", "conditions=[l2]",
        "evaluate.metrics=[l2]",
    )
    result = generate(config, tmp_path / "set", device="cpu", progress=False)
    (condition,) = result.manifest["conditions"]
    assert condition["metrics"]["kl"] > 0  # the posterior KL of the test images, nats
    assert condition["rate"]["kl_target"] == 30 and condition["rate"]["trajectory"]
    assert "guard" in condition
    for stimulus in result.manifest["stimuli"]:
        assert stimulus["metrics"]["kl"] >= 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "set" / "evaluation.csv")
    assert {"kl", "guard"} <= set(table.columns)
    assert result.manifest["provenance"]["training"]["l2"]["final_kl"] > 0


# ----------------------------------------------------------------------------- provenance


def _git(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_git_commit_names_the_projects_own_source_not_the_callers_repository(tmp_path):
    import shutil

    import generation
    from generation.pipeline import git_commit, source_checkout

    package = Path(generation.__file__).parent
    ours = source_checkout()
    if ours is None:
        pytest.skip("this copy of the project is not a git checkout")
    assert git_commit() == _git(ours, "rev-parse", "HEAD")
    other = tmp_path / "other"
    other.mkdir()
    _git(other, "init", "-q")
    (other / "x.txt").write_text("x")
    _git(other, "add", "x.txt")
    _git(other, "commit", "-q", "-m", "other")
    theirs = _git(other, "rev-parse", "HEAD")
    # a command started in another repository, even with GIT_DIR pointing at it
    code = "from generation.pipeline import git_commit; print(git_commit())"
    env = {**os.environ, "GIT_DIR": str(other / ".git"), "PYTHONPATH": str(package.parent)}
    printed = subprocess.run([sys.executable, "-c", code], cwd=other, env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert printed == git_commit() != theirs
    # an installed copy inside another repository (site-packages in its virtualenv, or
    # committed there below the top level) is not that repository's source
    for relative in (".venv/lib/python3/site-packages/generation", "vendor/generation"):
        copy = other / relative
        shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
        _git(other, "add", "-f", relative)
        _git(other, "commit", "-q", "-m", "copy")
        assert source_checkout(copy) is None and git_commit(copy) is None
    # at the top level of a repository that is not this project
    shutil.copytree(package, other / "generation", ignore=shutil.ignore_patterns("__pycache__"))
    (other / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')
    _git(other, "add", "generation", "pyproject.toml")
    _git(other, "commit", "-q", "-m", "vendored")
    assert git_commit(other / "generation") is None
