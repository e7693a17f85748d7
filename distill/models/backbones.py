"""ResNet / ResNeXt + FPN backbones at any FPN width, with optional ImageNet weights from torchvision's enums."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from runtime.errors import UserError

# name -> (constructor, ImageNet weights). IMAGENET1K_V1 everywhere: the torchvision:// weights MMDetection loads.
BACKBONES = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1),
    "resnext101_64x4d": (models.resnext101_64x4d, models.ResNeXt101_64X4D_Weights.IMAGENET1K_V1),
}
NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


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
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}", where="model.backbone", fix=f"use one of {sorted(BACKBONES)}")
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}", where="model.norm", fix=f"use one of {sorted(NORMS)}")
    if fpn_width < 1:
        raise UserError(f"fpn_width must be positive, got {fpn_width}", where="model.fpn_width")
    net = BACKBONES[backbone][0](weights=None, norm_layer=NORMS[norm])
    if pretrained:
        load_imagenet_weights(net, backbone)
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else 5
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    train += ["bn1"] if trainable_layers == 5 else []
    for name, param in net.named_parameters():
        param.requires_grad_(any(name.startswith(prefix) for prefix in train))
    stage_channels = {k: net.inplanes // 8 * 2 ** (k - 1) for k in (1, 2, 3, 4)}  # inplanes = C5 width after build
    return BackboneWithFPN(
        net,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(returned_layers)},
        in_channels_list=[stage_channels[k] for k in returned_layers],
        out_channels=fpn_width,
        extra_blocks=extra_blocks,
    )


def c5_channels(backbone: str) -> int:
    """Channels of the last ResNet stage (C5): 512 for the basic-block nets, 2048 for bottleneck ones."""
    return 512 if backbone in ("resnet18", "resnet34") else 2048


def fpn_features(model: nn.Module, normalized: torch.Tensor) -> list[torch.Tensor]:
    """A detector's FPN maps (finest first) for a normalised (B,3,S,S) batch, as a list."""
    feats = model.backbone(normalized)
    return list(feats.values()) if isinstance(feats, dict) else [feats]
