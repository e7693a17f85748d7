"""Backbones + FPN at any FPN width: ResNet / ResNeXt and MobileNetV3-Large, with optional ImageNet weights.

Every builder returns torchvision's BackboneWithFPN (`.body`, `.fpn`, `.out_channels`), so detectors, DS2D2's
adapter, export and the MMDetection variant see the same structure whatever network sits underneath. Stages are
numbered by stride like ResNet's: 1..4 = C2..C5 (strides 4, 8, 16, 32).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from runtime.errors import UserError

# name -> (constructor, ImageNet weights). IMAGENET1K_V1 everywhere: for ResNets the torchvision:// weights
# MMDetection loads; for MobileNetV3-Large the weights torchvision's own detection models start from.
RESNETS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1),
    "resnext101_64x4d": (models.resnext101_64x4d, models.ResNeXt101_64X4D_Weights.IMAGENET1K_V1),
}
MOBILENETS = {
    "mobilenet_v3_large": (models.mobilenet_v3_large, models.MobileNet_V3_Large_Weights.IMAGENET1K_V1),
}
BACKBONES = RESNETS | MOBILENETS
NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}
# Output channels of C2..C5. MobileNetV3-Large's C5 is its final 1x1 conv (960), the feature ImageNet trained.
STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048), "resnet101": (256, 512, 1024, 2048),
    "resnext101_64x4d": (256, 512, 1024, 2048),
    "mobilenet_v3_large": (24, 40, 112, 960),
}
MOBILENET_BN_EPS = 1e-3  # the eps MobileNetV3's ImageNet weights were trained with (ResNets use torch's 1e-5)


def _check(backbone: str, norm: str, fpn_width: int) -> None:
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}", where="model.backbone", fix=f"use one of {sorted(BACKBONES)}")
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}", where="model.norm", fix=f"use one of {sorted(NORMS)}")
    if fpn_width < 1:
        raise UserError(f"fpn_width must be positive, got {fpn_width}", where="model.fpn_width")


def load_imagenet_weights(net: nn.Module, backbone: str) -> None:
    """Load torchvision's ImageNet weights for `backbone` into `net`; a failed download becomes a UserError."""
    weights = BACKBONES[backbone][1]
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # urllib / OSError / hub errors all mean the same to the user
        hub = torch.hub.get_dir()
        raise UserError(
            f"could not get ImageNet weights {weights} for backbone {backbone!r} ({type(exc).__name__}: {exc})",
            where="model.pretrained_backbone",
            fix=f"set pretrained_backbone: false (e.g. --set ...pretrained_backbone=false), or place "
            f"{weights.url.rsplit('/', 1)[-1]} from {weights.url} in {hub}/checkpoints",
        ) from exc
    net.load_state_dict(state)


def backbone_fpn(
    backbone: str,
    fpn_width: int,
    *,
    pretrained: bool,
    norm: str,
    returned_layers: Sequence[int],
    extra_blocks: ExtraFPNBlock | None,
    trainable_layers: int | None = None,
) -> BackboneWithFPN:
    """The named backbone returning stages `returned_layers` (1..4 = C2..C5) through an FPN of `fpn_width` channels."""
    _check(backbone, norm, fpn_width)
    build = mobilenet_fpn if backbone in MOBILENETS else resnet_fpn
    return build(backbone, fpn_width, pretrained=pretrained, norm=norm, returned_layers=returned_layers,
                 extra_blocks=extra_blocks, trainable_layers=trainable_layers)


def resnet_fpn(
    backbone: str,
    fpn_width: int,
    *,
    pretrained: bool,
    norm: str,
    returned_layers: Sequence[int],
    extra_blocks: ExtraFPNBlock | None,
    trainable_layers: int | None = None,
) -> BackboneWithFPN:
    """ResNet body returning the given stages (1..4 = C2..C5) through an FPN of `fpn_width` channels.

    `trainable_layers` counts stages from the top (torchvision's convention); default 3 with pretrained weights
    (stem and layer1 frozen, like the reference's frozen_stages=1) and 5 (everything trains) from scratch.
    """
    _check(backbone, norm, fpn_width)
    if backbone not in RESNETS:
        raise UserError(f"{backbone!r} is not a ResNet", where="model.backbone", fix=f"use one of {sorted(RESNETS)}")
    net = RESNETS[backbone][0](weights=None, norm_layer=NORMS[norm])
    if pretrained:
        load_imagenet_weights(net, backbone)
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else 5
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    train += ["bn1"] if trainable_layers == 5 else []
    for name, param in net.named_parameters():
        param.requires_grad_(any(name.startswith(prefix) for prefix in train))
    return BackboneWithFPN(
        net,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(returned_layers)},
        in_channels_list=[STAGE_CHANNELS[backbone][k - 1] for k in returned_layers],
        out_channels=fpn_width,
        extra_blocks=extra_blocks,
    )


def mobilenet_stage_starts(features: nn.Sequential) -> list[int]:
    """Index in `features` of the first block of the stem and of each stage C2..C5 (strides 2, 4, 8, 16, 32).

    torchvision marks the stride-2 block that opens each stage with `_is_cn`; the stem is everything before C2.
    """
    starts = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    if len(starts) != 4:
        raise ValueError(f"expected 4 strided stages after the stem, found {len(starts)}")
    return [0, *starts]


def _mobilenet_norm(norm: str) -> Callable[..., nn.Module]:
    # Keep the eps of the ImageNet weights; momentum stays torch's 0.1 (torchvision's 0.01 is an ImageNet-recipe
    # choice that leaves a short from-scratch run with running statistics far behind the batch statistics).
    return partial(NORMS[norm], eps=MOBILENET_BN_EPS)


def mobilenet_fpn(
    backbone: str,
    fpn_width: int,
    *,
    pretrained: bool,
    norm: str,
    returned_layers: Sequence[int],
    extra_blocks: ExtraFPNBlock | None,
    trainable_layers: int | None = None,
) -> BackboneWithFPN:
    """MobileNetV3 `features` returning the ends of the given stages (1..4 = C2..C5) through an FPN.

    `trainable_layers` counts stages from the top like resnet_fpn: default 3 with pretrained weights (stem and the
    stride-2/4 blocks frozen, the analogue of frozen_stages=1) and 5 (everything trains) from scratch.
    """
    _check(backbone, norm, fpn_width)
    if backbone not in MOBILENETS:
        raise UserError(f"{backbone!r} is not a MobileNet", where="model.backbone",
                        fix=f"use one of {sorted(MOBILENETS)}")
    net = MOBILENETS[backbone][0](weights=None, norm_layer=_mobilenet_norm(norm))
    if pretrained:
        load_imagenet_weights(net, backbone)
    features = net.features  # the classifier is not part of a detector
    starts = mobilenet_stage_starts(features)
    ends = [s - 1 for s in starts[2:]] + [len(features) - 1]  # last block of C2..C5: the deepest map per stride
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else 5
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    # The top `trainable_layers` of (stem, C2, C3, C4, C5) train, as for ResNets.
    first_trained = len(features) if trainable_layers == 0 else starts[5 - trainable_layers]
    for index, block in enumerate(features):
        block.requires_grad_(index >= first_trained)
    return BackboneWithFPN(
        features,
        return_layers={str(ends[k - 1]): str(i) for i, k in enumerate(returned_layers)},
        in_channels_list=[STAGE_CHANNELS[backbone][k - 1] for k in returned_layers],
        out_channels=fpn_width,
        extra_blocks=extra_blocks,
    )


def c5_channels(backbone: str) -> int:
    """Channels of the last backbone stage (C5): 512 for the basic-block ResNets, 2048 for bottleneck ones, 960 for
    MobileNetV3-Large."""
    if backbone not in STAGE_CHANNELS:
        raise UserError(f"unknown backbone {backbone!r}", where="model.backbone", fix=f"use one of {sorted(BACKBONES)}")
    return STAGE_CHANNELS[backbone][3]


def fpn_features(model: nn.Module, normalized: torch.Tensor) -> list[torch.Tensor]:
    """A detector's FPN maps (finest first) for a normalised (B,3,S,S) batch, as a list."""
    feats = model.backbone(normalized)
    return list(feats.values()) if isinstance(feats, dict) else [feats]
