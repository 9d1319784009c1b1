"""Calibrating losses on 2AFC judgments: fits recover a hidden truth, loaders, the CLI."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from generation.calibration.fit import FitSettings, fit_loss, weighted_score
from generation.calibration.judgments import (
    JudgmentsError,
    export_cells,
    group_bootstrap,
    human_ceiling,
    load_bapps,
    load_csv,
    load_export,
    score_2afc,
    split_by_group,
)
from generation.calibration.synthetic import distortion_triplets, label_with, true_distances
from generation.losses import build_loss
from generation.losses.fitted import save_fitted
from study_app.cli import main
from tests.losses_support import one_torch_thread  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean()


def test_score_ceiling_and_bootstrap_match_direct_computations():
    d0 = np.array([1.0, 2.0, 3.0, 3.0])
    d1 = np.array([2.0, 1.0, 3.0, 1.0])
    f = np.array([0.2, 0.8, 0.6, 0.0])
    # LPIPS: d0 < d1 -> 1 - f; d1 < d0 -> f; ties 0.5
    assert score_2afc(d0, d1, f).tolist() == [0.8, 0.8, 0.5, 0.0]
    np.testing.assert_allclose(human_ceiling(f), [0.68, 0.68, 0.52, 1.0])
    values, group = np.arange(6.0), np.array(list("aabbcc"))
    summary = group_bootstrap(values, np.ones(6), group, n_boot=4000, seed=1)
    assert summary["mean"] == pytest.approx(2.5)
    # group means 0.5, 2.5, 4.5: a bootstrap of three clusters spans most of that range
    assert 0.5 <= summary["ci_low"] < 2.5 < summary["ci_high"] <= 4.5


def test_split_is_by_reference_and_seeded():
    triplets = distortion_triplets(10, versions=3, seed=3)
    train, val = split_by_group(triplets, 0.3, seed=4)
    assert not set(train.group) & set(val.group)
    assert len(train) + len(val) == len(triplets) and val.n_groups == 3
    again = split_by_group(triplets, 0.3, seed=4)[1]
    assert list(again.group) == list(val.group)


@pytest.mark.slow
def test_watson_dft_fit_recovers_a_hidden_watson(tmp_path):
    """Truth: thresholds rise steeply with frequency and chroma is nearly ignored."""
    triplets = distortion_triplets(24, versions=6, size=32, seed=1)
    truth = build_loss("watson-dft")
    with torch.no_grad():
        u, v = torch.meshgrid(torch.arange(8.0), torch.arange(5.0), indexing="ij")
        frequency = torch.minimum(u, 8 - u) + v
        truth.t_tilde += (0.35 * frequency).reshape(1, -1) - 0.5
        truth.channel_logits.copy_(torch.tensor([2.5, -1.0, -1.0]))
    labelled, _ = label_with(truth, triplets, noise=0.1)
    train, val = split_by_group(labelled, 0.3, seed=0)
    true_score = weighted_score(*true_distances(truth, val), val)
    start = build_loss("watson-dft")
    result = fit_loss(build_loss("watson-dft"), train, val, FitSettings(max_epochs=25, patience=6))
    unfitted, fitted = weighted_score(*result.unfitted, val), weighted_score(*result.fitted, val)
    assert unfitted < true_score - 0.05, (unfitted, true_score)
    assert fitted >= true_score - 0.01, (fitted, true_score)
    # the luminance thresholds' shape (a common factor does not change any ranking) and
    # the channel weights move toward the truth
    gap = lambda loss: (centred(loss.t_tilde[0]) - centred(truth.t_tilde[0])).abs().mean()  # noqa: E731
    assert gap(result.module) < 0.8 * gap(start)
    assert result.module.channel_weights[0] > start.channel_weights[0] + 0.2
    assert result.history["val_2afc"].iloc[result.best_epoch] == pytest.approx(fitted)
    # the fitted file loads through build_loss and gives the fitted distances
    path = save_fitted(tmp_path / "fit.pt", "watson-dft", {"start": "calibrated"}, result.module)
    loaded = build_loss("watson-dft", weights=str(path))
    np.testing.assert_allclose(true_distances(loaded, val)[1], result.fitted[1], rtol=1e-5)
    assert not torch.equal(loaded.t_tilde, start.t_tilde)


@pytest.mark.slow
def test_deep_head_fit_recovers_known_channel_weights():
    """Truth: random weights on the first two stages of EfficientNet-Lite0, zero after."""
    triplets = distortion_triplets(60, versions=6, size=32, seed=1)
    truth = build_loss("deep")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for index, weights in enumerate(truth.channel_weights):
            weights.copy_(4 * torch.rand(weights.shape, generator=generator))
            if index > 1:
                weights.zero_()
    labelled, _ = label_with(truth, triplets, noise=0.1)
    train, val = split_by_group(labelled, 0.3, seed=0)
    true_score = weighted_score(*true_distances(truth, val), val)
    result = fit_loss(build_loss("deep"), train, val, FitSettings())
    unfitted, fitted = weighted_score(*result.unfitted, val), weighted_score(*result.fitted, val)
    assert unfitted < true_score - 0.03, (unfitted, true_score)
    assert fitted >= true_score - 0.01, (fitted, true_score)
    weights = torch.cat(result.module.channel_weights)
    true_weights = torch.cat(truth.channel_weights)
    cosine = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    assert (weights >= 0).all()
    assert cosine(weights, true_weights) > cosine(torch.ones_like(weights), true_weights) + 0.1
    # the fitted module's distances are the loss's own (buffers written back)
    d0, _ = true_distances(result.module, val)
    np.testing.assert_allclose(d0, result.fitted[0], rtol=1e-4)


def _save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def write_judgments_csv(triplets, path):
    """Triplets as a judgments CSV (ref, a, b, fraction_a) with their images next to it."""
    rows = []
    for index in range(len(triplets)):
        names = []
        for role, image in (("r", triplets.ref), ("a", triplets.p0), ("b", triplets.p1)):
            name = f"{role}{image[index]}.png"
            if not (path.parent / name).exists():
                _save_png(
                    path.parent / name, triplets.images[image[index]].numpy().transpose(1, 2, 0)
                )
            names.append(name)
        rows.append((*names, 1 - triplets.fraction[index]))
    pd.DataFrame(rows, columns=["ref", "a", "b", "fraction_a"]).to_csv(path, index=False)


def make_bapps(root, count=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    fractions = rng.uniform(0, 1, count)
    for index in range(count):
        stem = f"{index:06d}"
        for folder in ("ref", "p0", "p1"):
            _save_png(root / folder / f"{stem}.png", rng.uniform(0, 1, (size, size, 3)))
        (root / "judge").mkdir(exist_ok=True)
        np.save(root / "judge" / f"{stem}.npy", np.array([fractions[index]]))
    return fractions


def test_bapps_folder_loads(tmp_path):
    fractions = make_bapps(tmp_path / "cnn")
    make_bapps(tmp_path / "mix", count=3, seed=1)
    one = load_bapps(tmp_path / "cnn")
    assert len(one) == 6 and one.images.shape == (18, 3, 16, 16)
    np.testing.assert_allclose(one.fraction, fractions)
    with Image.open(tmp_path / "cnn" / "p1" / "000002.png") as image:
        expected = np.asarray(image, np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(one.images[one.p1[2]].numpy(), expected)
    both = load_bapps(tmp_path)  # a folder of BAPPS folders
    assert len(both) == 9 and both.n_groups == 9
    assert one.source["sha256"] == load_bapps(tmp_path / "cnn").source["sha256"]


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing_judge_folder", "missing folder judge/"),
        ("missing_judge_file", "judge/000003.npy is missing"),
        ("shape", "p0/000001.png is 8×8 px"),
        ("fraction", "judge/000004.npy: fraction 1.5 is outside [0, 1]"),
        ("judge_array", "judge/000002.npy: expected one number"),
    ],
)
def test_malformed_bapps_folder_names_the_file(tmp_path, breakage, message):
    make_bapps(tmp_path)
    judge = tmp_path / "judge"
    if breakage == "missing_judge_folder":
        for file in judge.iterdir():
            file.unlink()
        judge.rmdir()
    elif breakage == "missing_judge_file":
        (judge / "000003.npy").unlink()
    elif breakage == "shape":
        _save_png(tmp_path / "p0" / "000001.png", np.zeros((8, 8, 3)))
    elif breakage == "fraction":
        np.save(judge / "000004.npy", np.array([1.5]))
    else:
        np.save(judge / "000002.npy", np.zeros((2, 2)))
    with pytest.raises(JudgmentsError, match=None) as error:
        load_bapps(tmp_path)
    assert message in str(error.value)
    result = CliRunner().invoke(
        main, ["losses", "fit", "--loss", "watson-dct", "--bapps", str(tmp_path)]
    )
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_csv_judgments_and_their_errors(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("r", "a", "b"):
        _save_png(tmp_path / f"{name}.png", rng.uniform(0, 1, (16, 16, 3)))
    good = tmp_path / "j.csv"
    good.write_text("ref,a,b,fraction_a\nr.png,a.png,b.png,0.25\nr.png,b.png,a.png,1\n")
    triplets = load_csv(good)
    assert triplets.fraction.tolist() == [0.75, 0.0] and len(triplets.images) == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("ref,a,b,fraction_a\nr.png,a.png,b.png,0.5\nr.png,a.png,b.png,-0.1\n")
    with pytest.raises(JudgmentsError, match=r"bad.csv row 3: fraction_a -0.1 is outside"):
        load_csv(bad)
    bad.write_text("ref,a,fraction\nr.png,a.png,0.5\n")
    with pytest.raises(JudgmentsError, match="missing column"):
        load_csv(bad)
    bad.write_text("ref,a,b,fraction_a\nr.png,a.png,nope.png,0.5\n")
    with pytest.raises(JudgmentsError, match=r"row 2: image .*nope.png does not exist"):
        load_csv(bad)


def _simulated_export(tmp_path):
    """A stimulus set folder (no manifest) and contract-2 votes on it."""
    rng = np.random.default_rng(2)
    conditions = ("l2", "ssim", "deep")
    for image in ("img0", "img1", "img2"):
        _save_png(
            tmp_path / "stimuli" / "reference" / f"{image}.png", rng.uniform(0, 1, (16, 16, 3))
        )
        for condition in conditions:
            _save_png(
                tmp_path / "stimuli" / condition / f"{image}.png", rng.uniform(0, 1, (16, 16, 3))
            )
    rows = []
    for participant in range(7):
        for trial, image in enumerate(("img0", "img1", "img2") * 2):
            left, right = rng.choice(conditions, 2, replace=False)
            kind = "catch" if trial == 5 else "main"
            rows.append(
                {
                    "study": "s",
                    "participant": f"p{participant}",
                    "trial_kind": kind,
                    "image_id": image,
                    "condition_left": left,
                    "condition_right": right,
                    "choice": "left" if rng.uniform() < 0.6 else "right",
                    "participant_excluded": participant == 6,
                }
            )
    frame = pd.DataFrame(rows)
    frame["expected_condition"] = np.where(
        frame["trial_kind"] == "catch", frame["condition_left"], ""
    )
    frame["chosen_condition"] = np.where(
        frame["choice"] == "left", frame["condition_left"], frame["condition_right"]
    )
    frame.to_csv(tmp_path / "votes.csv", index=False)
    return frame


def test_export_to_triplets_gives_the_votes_fractions(tmp_path):
    frame = _simulated_export(tmp_path)
    triplets = load_export(tmp_path / "votes.csv", tmp_path / "stimuli")
    # the votes counted directly: main trials of included participants, per unordered pair
    kept = frame[(frame["trial_kind"] == "main") & ~frame["participant_excluded"]]
    expected = {}
    for row in kept.itertuples():
        a, b = sorted((row.condition_left, row.condition_right))
        votes = expected.setdefault((row.image_id, a, b), [])
        votes.append(row.chosen_condition == b)
    assert len(triplets) == len(expected)
    cells = export_cells(pd.read_csv(tmp_path / "votes.csv"))
    for cell, fraction, weight in zip(
        cells.itertuples(), triplets.fraction, triplets.weight, strict=True
    ):
        votes = expected[(cell.image_id, cell.condition_a, cell.condition_b)]
        assert fraction == pytest.approx(np.mean(votes)) and weight == len(votes)
    # p0 is condition_a's image, p1 condition_b's, ref the reference
    first = cells.iloc[0]
    with Image.open(tmp_path / "stimuli" / first.condition_b / f"{first.image_id}.png") as image:
        expected_p1 = np.asarray(image, np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(triplets.images[triplets.p1[0]].numpy(), expected_p1)
    assert set(triplets.group) == {"img0", "img1", "img2"}
    # the same through the command line: the card names the export and its hash
    out = tmp_path / "fit" / "watson-dct.pt"
    args = ["--responses", str(tmp_path / "votes.csv"), "--stimuli", str(tmp_path / "stimuli")]
    result = CliRunner().invoke(
        main,
        [
            "losses",
            "fit",
            "--loss",
            "watson-dct",
            *args,
            "--out",
            str(out),
            "--max-epochs",
            "1",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "fit" / "watson-dct.pt.card.json").read_text())
    assert card["data"]["kind"] == "export"
    assert (
        card["data"]["sha256"] == hashlib.sha256((tmp_path / "votes.csv").read_bytes()).hexdigest()
    )
    assert (card["split"]["train_references"], card["split"]["validation_references"]) == (2, 1)
    assert card["split"]["train_triplets"] + card["split"]["validation_triplets"] == len(triplets)
    result = CliRunner().invoke(main, ["losses", "fit", "--loss", "watson-dct", args[0], args[1]])
    assert result.exit_code == 2 and "--responses needs --stimuli" in result.output


def test_cli_fit_writes_a_deterministic_file_that_build_loss_loads(tmp_path):
    triplets = distortion_triplets(12, versions=5, size=16, seed=2)
    truth = build_loss("watson-dct")
    with torch.no_grad():
        truth.channel_logits.copy_(torch.tensor([3.0, -1.0, -1.0]))
    labelled, _ = label_with(truth, triplets)
    write_judgments_csv(labelled, tmp_path / "j.csv")
    runner, hashes = CliRunner(), []
    for run in ("one", "two"):
        out = tmp_path / run / "watson-dct.pt"
        args = [
            "losses",
            "fit",
            "--loss",
            "watson-dct",
            "--csv",
            str(tmp_path / "j.csv"),
            "--out",
            str(out),
        ]
        result = runner.invoke(main, [*args, "--max-epochs", "4", "--no-progress", "--seed", "3"])
        assert result.exit_code == 0, result.output
        hashes.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert hashes[0] == hashes[1]
    card = json.loads((tmp_path / "one" / "watson-dct.pt.card.json").read_text())
    assert card["weights_sha256"] == hashes[0] and card["split"]["seed"] == 3
    assert set(card["validation_2afc"]) == {
        "fitted",
        "unfitted",
        "l2",
        "ssim",
        "human_ceiling",
        "oracle",
    }
    assert card["validation_2afc"]["fitted"]["mean"] >= card["validation_2afc"]["unfitted"]["mean"]
    # --init starts from a fitted file: its score is the new fit's "unfitted" score
    args = ["losses", "fit", "--loss", "watson-dct", "--csv", str(tmp_path / "j.csv")]
    first_out = tmp_path / "one" / "watson-dct.pt"
    result = runner.invoke(
        main,
        [
            *args,
            "--init",
            str(first_out),
            "--out",
            str(tmp_path / "three.pt"),
            "--max-epochs",
            "1",
            "--no-progress",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "three.pt.card.json").read_text())
    assert again["validation_2afc"]["unfitted"] == card["validation_2afc"]["fitted"]
    assert again["training"]["init"]["sha256"] == hashes[0]
    shown = runner.invoke(main, ["losses", "show", str(tmp_path / "one" / "watson-dct.pt")])
    assert shown.exit_code == 0 and "human_ceiling" in shown.output
    # build_loss(name, weights=FILE) restores exactly the fitted parameters
    payload = torch.load(tmp_path / "one" / "watson-dct.pt", weights_only=True)
    loaded = build_loss("watson-dct", weights=str(tmp_path / "one" / "watson-dct.pt"))
    for key, tensor in payload["state_dict"].items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fitted for 'watson-dct', not 'watson-dft'"):
        build_loss("watson-dft", weights=str(tmp_path / "one" / "watson-dct.pt"))
    with pytest.raises(ValueError, match="not a fitted-loss file"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
        build_loss("watson-dct", weights=str(tmp_path / "other.pt"))
    # a generation config takes the file as loss_options (checked before any training)
    from generation.cli import _check_losses
    from generation.config import ConfigError

    condition = {"name": "fitted", "loss": "watson-dct", "loss_options": {"weights": str(out)}}
    _check_losses({"evaluate": {"metrics": "all"}, "conditions": [condition]})
    condition["loss"] = "watson-dft"
    with pytest.raises(ConfigError, match="fitted for 'watson-dct'"):
        _check_losses({"evaluate": {"metrics": "all"}, "conditions": [condition]})


def test_a_refitted_loss_file_changes_the_generation_hashes(tmp_path):
    from generation.pipeline import loss_file_hashes

    path = save_fitted(tmp_path / "fit.pt", "watson-dct", {}, build_loss("watson-dct"))
    config = {
        "conditions": [
            {"name": "fitted", "loss": "watson-dct", "loss_options": {"weights": str(path)}},
            {"name": "plain", "loss": "l2", "loss_options": {}},
        ]
    }
    first = loss_file_hashes(config)
    assert first == {"fitted": hashlib.sha256(path.read_bytes()).hexdigest()}
    refit = build_loss("watson-dct")
    with torch.no_grad():
        refit.alpha += 0.1
    save_fitted(path, "watson-dct", {}, refit)
    assert loss_file_hashes(config)["fitted"] != first["fitted"]


def test_lpips_head_fits_on_a_given_trunk_and_loads_with_it(tmp_path):
    """lpips-alex with a seeded random AlexNet trunk (no ImageNet weights offline)."""
    from tests.losses_support import random_trunk_features

    trunk = tmp_path / "alex.pth"
    torch.save(random_trunk_features("alex", 0), trunk)
    triplets = distortion_triplets(6, versions=4, size=32, seed=0)
    labelled, _ = label_with(build_loss("l2"), triplets)
    write_judgments_csv(labelled, tmp_path / "j.csv")
    out = tmp_path / "lpips-alex.pt"
    args = ["losses", "fit", "--loss", "lpips-alex", "--csv", str(tmp_path / "j.csv")]
    result = CliRunner().invoke(
        main,
        [
            *args,
            "--trunk-weights",
            str(trunk),
            "--out",
            str(out),
            "--max-epochs",
            "3",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = torch.load(out, weights_only=True)
    assert sorted(payload["state_dict"]) == [f"channel_weights_{k}" for k in range(5)]
    loaded = build_loss("lpips-alex", weights=str(out), trunk_weights=str(trunk))
    for k, weights in enumerate(loaded.channel_weights):
        torch.testing.assert_close(weights, payload["state_dict"][f"channel_weights_{k}"])
        assert (weights >= 0).all()
