"""The degeneracy guard (generation/guard.py): synthetic degenerate and healthy sets, and
the guard's place in the pipeline (console, manifest, evaluation.csv, contact sheet,
--strict, ``pstudy study create``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from generation.data import skimage_patches
from generation.guard import KINDS, _gaussian_blur, check_reconstructions, flagged
from generation.pipeline import DegenerateStimuliError, generate
from tests.test_generation import TINY, _tiny


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[32, 64], ids=["32px", "64px"])
def references(request) -> torch.Tensor:
    """Held-out photo patches as float [0, 1] (what the guard sees in a real run)."""
    size = request.param
    return skimage_patches(size=size, channels=3, seed=0, n_train=1, n_test=12).test.images / 255


def _quantised(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _tile_pattern(shape, period: int, amplitude: float) -> torch.Tensor:
    """A pattern repeating every ``period`` px: dots (period 8) or a checkerboard (2)."""
    n, c, h, w = shape
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    if period == 2:
        pattern = ((y + x) % 2) * 2.0 - 1.0
    else:
        pattern = ((y % period == 3) & (x % period == 3)).float() * 2.0 - 0.1
    colour = torch.tensor([1.0, -0.5, 0.3]).view(1, 3, 1, 1)[:, :c]
    return amplitude * pattern.view(1, 1, h, w) * colour


def _lattice(shape, amplitude: float) -> torch.Tensor:
    """A diagonal lattice not aligned with any 8-px grid (what Watson-DFT drew at 64 px)."""
    n, c, h, w = shape
    y, x = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    wave = torch.cos(2 * torch.pi * (6 * y + 2 * x) / 64) * torch.cos(
        2 * torch.pi * (2 * y - 6 * x) / 64
    )
    return amplitude * wave.view(1, 1, h, w).expand(1, c, h, w)


HEALTHY = {
    "identical": lambda ref: ref,
    "blurred σ=1.5": lambda ref: _gaussian_blur(ref, 1.5),
    "blurred σ=side/16": lambda ref: _gaussian_blur(ref, ref.shape[-1] / 16),
    "noisy σ=0.03": lambda ref: ref + 0.03 * torch.randn(ref.shape, generator=_g()),
    "half resolution": lambda ref: F.interpolate(
        F.avg_pool2d(ref, 2), scale_factor=2, mode="bilinear", align_corners=False
    ),
    "darker, less contrast": lambda ref: 0.15 + 0.7 * ref,
    "8-bit banding": lambda ref: (ref * 16).round() / 16,
}


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


DEGENERATE = {
    "nan": (lambda ref: torch.where(ref > 0.5, torch.nan, ref), {"nonfinite"}),
    "mean colour per image": (
        lambda ref: ref.mean((2, 3), keepdim=True).expand_as(ref),
        {"flat"},
    ),
    "mean image for all": (
        lambda ref: ref.mean(0, keepdim=True).expand_as(ref),
        {"same_for_all", "no_content"},
    ),
    "one sharp image for all": (lambda ref: ref[:1].expand_as(ref), {"same_for_all"}),
    "flat grey": (lambda ref: torch.full_like(ref, 0.5), {"flat", "same_for_all", "no_content"}),
    "black": (lambda ref: torch.zeros_like(ref), {"clipped", "flat", "no_content"}),
    "saturated": (lambda ref: torch.ones_like(ref), {"clipped", "flat", "no_content"}),
    "8-px grid of dots on the image": (
        lambda ref: _gaussian_blur(ref, 1.0) + _tile_pattern(ref.shape, 8, 0.08),
        {"grid"},
    ),
    "checkerboard on the image": (
        lambda ref: _gaussian_blur(ref, 1.0) + _tile_pattern(ref.shape, 2, 0.06),
        {"grid"},
    ),
    "a lattice texture on every image (period 10 px, diagonal)": (
        lambda ref: _gaussian_blur(ref, 2.0) + _lattice(ref.shape, 0.06),
        {"stamped"},
    ),
    "flat colour with a grid of dots": (
        lambda ref: ref.mean((2, 3), keepdim=True) + _tile_pattern(ref.shape, 8, 0.1),
        {"grid", "flat"},
    ),
    "checkerboard over a faint image": (
        lambda ref: 0.8 * ref.mean(0, keepdim=True)
        + 0.2 * ref
        + _tile_pattern(ref.shape, 2, 0.08),
        {"grid", "same_for_all"},
    ),
}


@pytest.mark.parametrize("case", list(HEALTHY))
def test_healthy_reconstructions_pass(references, case):
    output = _quantised(HEALTHY[case](references))
    verdict = check_reconstructions(_quantised(references), output)
    assert verdict.ok, (case, verdict.summary(), verdict.problems, verdict.stats)
    assert verdict.summary() == "ok"


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_each_degenerate_kind_is_caught(references, case):
    make, expected = DEGENERATE[case]
    output = make(references)
    if case != "nan":
        output = _quantised(output)
    verdict = check_reconstructions(_quantised(references), output)
    assert not verdict.ok
    assert expected <= set(verdict.kinds), (case, verdict.kinds, verdict.stats)
    assert verdict.summary().startswith("DEGENERATE (")
    record = verdict.as_dict()
    json.dumps(record, allow_nan=False)  # goes into manifest.json as it is
    for problem in record["problems"]:
        assert problem["kind"] in KINDS and problem["message"] and problem["fix"]


def test_nan_counted_before_quantisation_is_reported(references):
    verdict = check_reconstructions(
        _quantised(references), _quantised(references), nonfinite=5
    )
    assert verdict.kinds == ["nonfinite"] and "5 NaN/inf" in verdict.problems[0].message


def test_guard_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same N×C×H×W"):
        check_reconstructions(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 8, 8))


def test_flagged_reads_manifest_entries():
    conditions = [
        {"name": "a", "guard": {"ok": True}},
        {"name": "b", "guard": {"ok": False, "verdict": "DEGENERATE (flat)"}},
        {"name": "c"},
    ]
    assert list(flagged(conditions)) == ["b"]


# ----------------------------------------------------------------------------- pipeline

# one condition that cannot learn (learning rate ~0: the untrained decoder's near-constant
# grey for every input) next to two that train (briefly: smoke-sized models learn little,
# and the guard may flag them too, which these tests do not depend on)
BROKEN = [
    *TINY,
    "conditions=[{loss: l2, name: broken, lr: 1.0e-9}, l1, l2]",
    "train.steps=30",
    "train.lr=0.005",
    "model.width=8",
    "model.latent=32",
]


@pytest.fixture(scope="module")
def broken_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("guard") / "set"
    messages: list[str] = []
    result = generate(
        _tiny(*BROKEN[len(TINY) :]), out, device="cpu", progress=False, log=messages.append
    )
    return out, result, messages


def test_a_degenerate_condition_is_reported_everywhere(broken_set):
    out, result, messages = broken_set
    assert "broken" in result.degenerate, result.guard
    assert {"flat", "same_for_all"} <= {p["kind"] for p in result.guard["broken"]["problems"]}
    # console
    loud = [m for m in messages if m.startswith("!!")]
    assert any("DEGENERATE condition 'broken'" in m for m in loud)
    assert any("likely fix" in m for m in loud)
    # manifest
    manifest = json.loads((out / "manifest.json").read_text())
    guard = {c["name"]: c["guard"] for c in manifest["conditions"]}
    assert set(guard) == {"broken", "l1", "l2"}
    assert guard["broken"]["ok"] is False and guard["broken"]["problems"]
    assert guard["broken"]["verdict"].startswith("DEGENERATE")
    assert set(guard["broken"]["stats"]) >= {"contrast_ratio", "across_image_ratio", "psnr"}
    # evaluation.csv
    table = pd.read_csv(out / "evaluation.csv").set_index("condition")
    assert table.loc["broken", "guard"] == guard["broken"]["verdict"]
    assert table.loc["l1", "guard"] == guard["l1"]["verdict"]
    # contact sheet: the flagged row is framed and labelled in red, the reference row not
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB")).astype(int)
    red = (sheet[..., 0] > 150) & (sheet[..., 1] < 60) & (sheet[..., 2] < 60)
    rows = np.nonzero(red.any(1))[0]
    assert red.sum() > 100 and rows.min() > sheet.shape[0] / 4


def test_strict_fails_with_the_reason_and_the_fix(tmp_path):
    config = _tiny(*BROKEN[len(TINY) :], "guard.strict=true")
    with pytest.raises(DegenerateStimuliError) as caught:
        generate(config, tmp_path / "strict", device="cpu", progress=False)
    text = str(caught.value)
    assert "broken: flat images" in text and "likely fix:" in text
    assert "broken" in caught.value.flagged
    assert (tmp_path / "strict" / "manifest.json").exists()  # written for inspection
    # reusing the flagged set under strict fails too
    with pytest.raises(DegenerateStimuliError):
        generate(config, tmp_path / "strict", device="cpu", progress=False)


def test_cli_strict_exit_code_and_no_strict(tmp_path):
    from study_app.cli import main as pstudy

    args = ["generate", "--preset", "smoke", "--quiet", "--device", "cpu"]
    for item in BROKEN:
        args += ["--set", item]
    strict = CliRunner().invoke(pstudy, [*args, "--strict", "--out", str(tmp_path / "a")])
    assert strict.exit_code == 1, strict.output
    assert "degenerate" in strict.output and "likely fix" in strict.output
    assert "Traceback" not in strict.output
    loose = CliRunner().invoke(pstudy, [*args, "--no-strict", "--out", str(tmp_path / "a")])
    assert loose.exit_code == 0, loose.output
    assert "broken: PSNR" in loose.output and "guard DEGENERATE" in loose.output


def test_study_create_warns_about_flagged_conditions(broken_set, tmp_path):
    import shutil

    from study_app.commands import study

    out, _, _ = broken_set
    copy = tmp_path / "set"  # l1 and l2 marked healthy, whatever their brief training gave
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for condition in manifest["conditions"]:
        if condition["name"] != "broken":
            condition["guard"] = {**condition["guard"], "ok": True, "verdict": "ok"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    runner = CliRunner()
    created = runner.invoke(study, ["create", str(copy), "--database-url", url])
    assert created.exit_code == 0, created.output
    assert "warning: the generation guard flagged 1 condition(s)" in created.output
    assert "broken: DEGENERATE" in created.output
    healthy = runner.invoke(
        study, ["create", str(copy), "--slug", "healthy", "--conditions", "l1,l2",
                "--database-url", url],
    )
    assert healthy.exit_code == 0, healthy.output
    assert "generation guard" not in healthy.output
