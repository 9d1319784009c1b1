"""The loop in the analysis: fitted-loss files as metrics, and --fit-holdout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from analysis.clustered import two_way_rate
from analysis.metrics import (
    fit_holdout,
    fitted_metric_name,
    held_out_groups,
    metric_agreement,
    metric_distances,
)
from analysis.simulation import simulate_responses
from generation.losses import build_loss
from generation.losses.fitted import save_fitted
from study_app.cli import main
from tests.losses_support import one_torch_thread  # noqa: F401 - a fixture
from tests.study_support import write_stimulus_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(path) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
    return torch.from_numpy(array.transpose(2, 0, 1))[None]


@pytest.fixture
def fitted_file(tmp_path):
    loss = build_loss("watson-dct")
    with torch.no_grad():
        loss.channel_logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
        loss.t_tilde += 0.3
    return save_fitted(tmp_path / "mine.pt", "watson-dct", {"start": "calibrated"}, loss)


def test_fitted_file_is_a_metric_with_an_image_bootstrap_interval(tmp_path, fitted_file):
    root = write_stimulus_set(
        tmp_path / "set", n_images=6, conditions=("l1", "l2", "ssim"), size=16
    )
    distances, status = metric_distances(root, ["l2"], loss_files=(str(fitted_file),))
    name = fitted_metric_name(fitted_file)
    assert status.set_index("metric").loc[name, "status"] == "ok"
    loaded = build_loss("watson-dct", weights=str(fitted_file))
    for row in distances[distances["metric"] == name].itertuples():
        with torch.no_grad():
            expected = loaded(
                _image(root / row.condition / f"{row.image_id}.png"),
                _image(root / "reference" / f"{row.image_id}.png"),
            )
        assert row.distance == pytest.approx(float(expected), rel=1e-5)
    votes = simulate_responses({"l1": 2.0, "l2": 1.0, "ssim": 0.0}, 12, 6, 30, seed=3, model="bt")
    votes["image_id"] = votes["image_id"].str.replace("img", "img00")
    table = metric_agreement(votes, distances, n_boot=500, seed=1).set_index("metric")
    for metric in ("l2", name):
        low, score, high = table.loc[metric, ["ci_low", "score_2afc", "ci_high"]]
        assert low <= score <= high and high - low > 0
    again = metric_agreement(votes, distances, n_boot=500, seed=1).set_index("metric")
    pd.testing.assert_frame_equal(table, again)


@pytest.mark.slow
def test_analyze_with_loss_weights_and_fit_holdout(tmp_path, fitted_file):
    root = write_stimulus_set(
        tmp_path / "set", n_images=8, conditions=("l1", "l2", "ssim"), size=16
    )
    votes = simulate_responses({"l1": 2.0, "l2": 1.0, "ssim": 0.0}, 12, 8, 30, seed=4, model="bt")
    votes["image_id"] = votes["image_id"].str.replace("img", "img00")
    votes.to_csv(tmp_path / "votes.csv", index=False)
    runner = CliRunner()
    args = [
        "analyze",
        str(tmp_path / "votes.csv"),
        "--out",
        str(tmp_path / "out"),
        "--no-mixed",
        "--quiet",
    ]
    result = runner.invoke(
        main,
        [
            *args,
            "--stimuli",
            str(root),
            "--metric",
            "l2",
            "--loss-weights",
            str(fitted_file),
            "--fit-holdout",
            "watson-dct",
            "--n-boot",
            "200",
        ],
    )
    assert result.exit_code == 0, result.output
    agreement = pd.read_csv(tmp_path / "out" / "tables" / "metric_agreement.csv")
    assert set(agreement["metric"]) == {"l2", "fitted:mine.pt"}
    holdout = pd.read_csv(tmp_path / "out" / "tables" / "metric_holdout.csv")
    assert list(holdout["metric"]) == [
        "watson-dct (fitted on the other half)",
        "watson-dct (unfitted)",
        "l2",
        "ssim",
    ]
    assert (holdout["fitted_on_images"] + holdout["scored_images"] == 8).all()
    assert holdout["score_2afc"].between(0, 1).all()
    assert (holdout["ci_low"] <= holdout["score_2afc"]).all()
    # 4 held-out images: too few for an image variance, and the interval says so
    assert holdout["interval"].str.contains("fewer than 5 images").all()
    assert "metric_holdout" in (tmp_path / "out" / "report.html").read_text()
    result = runner.invoke(main, [*args, "--loss-weights", str(fitted_file)])
    assert result.exit_code == 2 and "needs --stimuli" in result.output
    other = tmp_path / "other.pt"
    torch.save({"x": torch.zeros(1)}, other)
    result = runner.invoke(main, [*args, "--stimuli", str(root), "--loss-weights", str(other)])
    assert result.exit_code == 2 and "not a fitted-loss file" in result.output


def _held_out_agreement(votes, root, seed):
    """Per held-out vote: participant, image and whether it chose the image with the
    smaller L2 distance (from ``metric_distances``, not the fit's triplet code)."""
    images = sorted(votes["image_id"].unique())
    held = held_out_groups(images, 0.5, seed)
    # the split rule itself: a seeded permutation of the sorted ids, the first half held
    order = np.random.default_rng(seed).permutation(len(images))
    assert list(held) == sorted(np.array(images)[order[: len(images) // 2]])
    distances, _ = metric_distances(root, ["l2"])
    lookup = distances.set_index(["image_id", "condition"])["distance"]
    scored = votes[votes["image_id"].isin(held)]
    d_left, d_right = (
        lookup.loc[list(zip(scored["image_id"], scored[side], strict=True))].to_numpy()
        for side in ("condition_left", "condition_right")
    )
    preferred = np.where(d_left < d_right, scored["condition_left"], scored["condition_right"])
    agree = (preferred == scored["chosen_condition"]).to_numpy(dtype=float)
    return scored, agree


def test_fit_holdout_scores_the_held_out_votes_with_participants_and_images_random(tmp_path):
    """The held-out 2AFC score and its interval equal ``two_way_rate`` of the per-vote
    agreement computed here; with participants who disagree among themselves (one half
    prefers the noisier image) the interval is well wider than a vote-level binomial one,
    which the old bootstrap over images did not see (baselines only: no fitting, fast)."""
    root = write_stimulus_set(
        tmp_path / "set", n_images=10, conditions=("l1", "l2", "ssim"), size=16
    )
    votes = simulate_responses(
        {"l1": 0.0, "l2": 0.0, "ssim": 0.0}, 16, 10, 40, observer_sd=3.0, seed=6, model="bt"
    )
    votes["image_id"] = votes["image_id"].str.replace("img", "img00")
    table = fit_holdout(votes, root, (), seed=2).set_index("metric")
    assert list(table.index) == ["l2", "ssim"]
    scored, agree = _held_out_agreement(votes, root, seed=2)
    expected = two_way_rate(agree, scored["participant"], scored["image_id"])
    row = table.loc["l2"]
    assert row["n_trials"] == len(agree)
    assert (row["fitted_on_images"], row["scored_images"]) == (5, 5)
    assert row["score_2afc"] == pytest.approx(agree.mean())
    assert row["ci_low"] == pytest.approx(expected["ci_low"], rel=1e-12)
    assert row["ci_high"] == pytest.approx(expected["ci_high"], rel=1e-12)
    assert row["interval"] == expected["interval"]
    binomial = 2 * 1.96 * np.sqrt(agree.mean() * (1 - agree.mean()) / len(agree))
    assert row["ci_high"] - row["ci_low"] > 1.5 * binomial
    # without participant effects the same study's interval is close to the binomial one
    calm = simulate_responses({"l1": 0.0, "l2": 0.0, "ssim": 0.0}, 16, 10, 40, seed=6, model="bt")
    calm["image_id"] = calm["image_id"].str.replace("img", "img00")
    row = fit_holdout(calm, root, (), seed=2).set_index("metric").loc["l2"]
    scored, agree = _held_out_agreement(calm, root, seed=2)
    binomial = 2 * 1.96 * np.sqrt(agree.mean() * (1 - agree.mean()) / len(agree))
    assert row["ci_high"] - row["ci_low"] < 1.3 * binomial
