"""generation under torchrun (two gloo processes on the CPU) and the fast training loop.

- ``train.distribute=conditions``: each process trains whole conditions; the stimulus set
  is byte-identical to one process's.
- ``train.distribute=data``: DistributedDataParallel, each process half of every batch
  (and its rows of the VAE's noise); the same set up to floating-point summation order.
- the device-resident batches give exactly the DataLoader's batches, fused/foreach Adam
  the per-parameter update.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from generation.config import resolve_config
from generation.data import TensorImages, in_memory, load_folder, skimage_patches
from generation.pipeline import generate
from generation.stimulus_set import read_png, validate_stimulus_set
from generation.train import _adam, gpu_index, train_condition
from tests.test_generation import TINY, _write_images, one_thread  # noqa: F401 (a fixture)

# two conditions of each kind the processes must agree on: a conv AE and a VAE trained to
# a rate (its noise, the multiplier's all-reduced KL)
PARALLEL = [
    *TINY,
    "train.checkpoint_every=12",
    "evaluate.metrics=[l2]",
    "conditions=[l2, {name: vae, loss: l1, architecture: vae, kl_target: 20, lr: 0.005}]",
]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("parallel") / "single"
    return generate(resolve_config("smoke", overrides=PARALLEL), out, device="cpu", progress=False)


def _torchrun(out: Path, *extra: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "generation", "--preset", "smoke", "--quiet"]
    command += ["--device", "cpu", "--threads", "1", "--out", str(out)]
    for item in [*PARALLEL, *extra]:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    manifest = validate_stimulus_set(out)
    assert manifest["provenance"]["world_size"] == 2
    return manifest


def _stimuli(out: Path, manifest: dict) -> dict[tuple[str, str], np.ndarray]:
    return {
        (s["condition"], s["image_id"]): read_png(out / s["path"]).numpy().astype(np.int16)
        for s in manifest["stimuli"]
    }


def test_two_processes_by_conditions_give_the_one_process_set(one_process, tmp_path):
    manifest = _torchrun(tmp_path / "conditions", "train.distribute=conditions")
    assert manifest["provenance"]["distribute"] == "conditions"
    single = one_process.manifest
    # the same config hash: how the work was spread is not part of what was computed
    assert manifest["provenance"]["config_sha256"] == single["provenance"]["config_sha256"]
    hashes = {(s["condition"], s["image_id"]): s["sha256"] for s in manifest["stimuli"]}
    assert hashes == {(s["condition"], s["image_id"]): s["sha256"] for s in single["stimuli"]}
    assert [c["checkpoint_sha256"] for c in manifest["conditions"]] == [
        c["checkpoint_sha256"] for c in single["conditions"]
    ]
    # the VAE (trained by the second process) reached rank 0 with its rate record
    vae = next(c for c in manifest["conditions"] if c["name"] == "vae")
    assert vae["rate"] == next(c for c in single["conditions"] if c["name"] == "vae")["rate"]


def test_two_processes_data_parallel_match_up_to_rounding(one_process, tmp_path):
    out = tmp_path / "data"
    manifest = _torchrun(out, "train.distribute=data")
    assert manifest["provenance"]["distribute"] == "data"
    training = manifest["provenance"]["training"]
    for name, result in one_process.training.items():
        # each step's loss over the global batch: the same batches, the same noise; the
        # gradient is averaged over two halves instead of one batch (summation order)
        assert training[name]["final_loss"] == pytest.approx(result.losses[-1], rel=1e-5)
    ours = _stimuli(out, manifest)
    theirs = _stimuli(one_process.out, one_process.manifest)
    assert ours.keys() == theirs.keys()
    for key, image in ours.items():
        difference = np.abs(image - theirs[key])
        assert difference.max() <= 1 and difference.mean() < 0.01, (key, difference.max())


def _train(dataset, tmp_path: Path, name: str, *extra: str):
    config = resolve_config("smoke", overrides=[*PARALLEL, *extra])
    return train_condition(
        config["conditions"][1],
        dataset,
        channels=3,
        size=32,
        seed=0,
        fingerprint="f",
        checkpoint_dir=tmp_path / name,
        device=torch.device("cpu"),
        progress=False,
    )


def test_resident_batches_train_exactly_as_the_data_loader(tmp_path):
    split = skimage_patches(size=32, channels=3, seed=0, n_train=40, n_test=1)
    assert isinstance(split.train, TensorImages)
    extra = ("train.steps=30", "train.checkpoint_every=7")  # 30 steps cross epochs and flushes
    resident = _train(split.train, tmp_path, "resident", *extra)
    # a Subset hands out the same items one by one, as a folder does: the DataLoader path
    items = torch.utils.data.Subset(split.train, range(len(split.train)))
    loader = _train(items, tmp_path, "loader", *extra)
    assert len(resident.losses) == 30 and resident.losses == loader.losses
    assert resident.kl == loader.kl and resident.rate == loader.rate
    assert resident.checkpoint_sha256 == loader.checkpoint_sha256


def test_a_folder_that_fits_is_decoded_once_into_memory(tmp_path):
    _write_images(tmp_path, 12)
    split = load_folder(tmp_path, size=16, channels=3, seed=0, test_fraction=0.25, n_test=1)
    folder = split.train
    held = in_memory(folder, max_bytes=len(folder) * 3 * 16 * 16)
    assert isinstance(held, TensorImages) and held.images.shape == (9, 3, 16, 16)
    assert all(torch.equal(held[i], folder[i]) for i in range(len(folder)))
    assert in_memory(folder, max_bytes=len(folder) * 3 * 16 * 16 - 1) is folder  # too big
    assert in_memory(held, max_bytes=0) is held


def test_foreach_adam_is_the_per_parameter_update():
    def run(make) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
        optimizer = make(model.parameters())
        x = torch.randn(32, 8)
        for _ in range(5):
            optimizer.zero_grad()
            ((model(x) - x) ** 2).mean().backward()
            optimizer.step()
        return [p.detach() for p in model.parameters()]

    ours = run(lambda params: _adam(params, 1e-2, cuda=False, betas=(0.5, 0.999)))
    loop = run(lambda params: torch.optim.Adam(params, lr=1e-2, betas=(0.5, 0.999), foreach=False))
    assert all(torch.equal(a, b) for a, b in zip(ours, loop, strict=True))


def test_distribute_is_checked_and_left_out_of_the_config_hash():
    from generation.config import ConfigError, config_sha256

    with pytest.raises(ConfigError, match="train.distribute must be one of conditions, data"):
        resolve_config("smoke", overrides=["train.distribute=gpus"])
    by_data = resolve_config("smoke", overrides=["train.distribute=data"])
    by_conditions = resolve_config("smoke")
    assert by_conditions["train"]["distribute"] == "conditions"
    assert config_sha256(by_data) == config_sha256(by_conditions)
    assert "distribute" not in by_data["conditions"][0]  # not part of any fingerprint


@pytest.mark.gpu
def test_cuda_loop_resident_fused_and_rate_on_the_device(tmp_path):
    """Where a GPU is present: the resident batches, fused Adam and the device-side rate
    controller train as the DataLoader path does (cuDNN may reorder sums: close, not equal)."""
    split = skimage_patches(size=32, channels=3, seed=0, n_train=40, n_test=1)
    config = resolve_config("smoke", overrides=[*PARALLEL, "train.steps=30"])
    common = dict(channels=3, size=32, seed=0, fingerprint="f", device=torch.device("cuda"))
    items = torch.utils.data.Subset(split.train, range(len(split.train)))
    results = [
        train_condition(
            config["conditions"][1], data, checkpoint_dir=tmp_path / name, progress=False, **common
        )
        for name, data in (("resident", split.train), ("loader", items))
    ]
    resident, loader = results
    assert len(resident.losses) == 30 and np.isfinite(resident.losses).all()
    np.testing.assert_allclose(resident.losses, loader.losses, rtol=1e-2)
    assert resident.rate["final_beta"] == pytest.approx(loader.rate["final_beta"], rel=1e-2)


def test_processes_share_gpus_only_when_they_train_whole_conditions():
    assert [gpu_index(rank, 1, share_gpus=True) for rank in range(6)] == [0] * 6
    assert [gpu_index(rank, 4, share_gpus=True) for rank in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [gpu_index(rank, 2, share_gpus=False) for rank in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="needs a GPU per process.*train.distribute=conditions"):
        gpu_index(2, 2, share_gpus=False)


def test_device_rate_controller_is_the_float_arithmetic_exactly():
    """The controller's tensors (float64, on the training device) give exactly what the
    float formulas of docs/generation.md give, step by step (β to the last bit of exp),
    and survive a checkpoint."""
    import math

    from generation.train import (
        KL_EMA_CAP,
        KL_EMA_DECAY,
        LOG_BETA_LIMITS,
        RATE_KP,
        RateControl,
    )

    target, dual_lr = 100.0, 0.05
    rate = RateControl(target=target, dual_lr=dual_lr, d0=2.0, log_beta=0.3)
    ema, log_beta = None, 0.3
    kls = np.random.default_rng(0).gamma(2.0, 60.0, 120).astype(np.float32)  # some > cap
    for step, kl in enumerate(kls):
        rate.update(torch.tensor(kl), step, len(kls))
        capped = min(float(kl), KL_EMA_CAP * target)
        ema = capped if ema is None else KL_EMA_DECAY * ema + (1 - KL_EMA_DECAY) * capped
        error = min(1.0, max(-1.0, ema / target - 1.0))
        log_beta = min(LOG_BETA_LIMITS[1], max(LOG_BETA_LIMITS[0], log_beta + dual_lr * error))
        assert (rate.kl_ema, rate.log_beta) == (ema, log_beta), step
        # torch.exp and math.exp may differ in the last bit (float64); β enters the
        # objective as float32, where one float64 ulp almost never changes the rounding
        beta = math.exp(log_beta + RATE_KP * error)
        assert abs(rate.beta - beta) <= math.ulp(beta), step
    resumed = RateControl(target=target, dual_lr=dual_lr, d0=1.0, log_beta=0.0)
    resumed.load_state(rate.state())
    assert resumed.state() == rate.state() and resumed.beta == rate.beta
    assert resumed.summary([1.0, 2.0]) == rate.summary([1.0, 2.0])
