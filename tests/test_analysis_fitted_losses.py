"""The loop in the analysis: fitted-loss files as metrics, and --fit-holdout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from analysis.metrics import fitted_metric_name, metric_agreement, metric_distances
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
    assert "metric_holdout" in (tmp_path / "out" / "report.html").read_text()
    result = runner.invoke(main, [*args, "--loss-weights", str(fitted_file)])
    assert result.exit_code == 2 and "needs --stimuli" in result.output
    other = tmp_path / "other.pt"
    torch.save({"x": torch.zeros(1)}, other)
    result = runner.invoke(main, [*args, "--stimuli", str(root), "--loss-weights", str(other)])
    assert result.exit_code == 2 and "not a fitted-loss file" in result.output
