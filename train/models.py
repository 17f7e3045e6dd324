"""Model definitions: our tiny CNN and three torchvision backbones, one interface.

Every model is an :class:`EdgeModel`: ``forward(x) -> logits`` and
``forward_with_embedding(x) -> (logits, embedding)`` where the embedding is the input of
the final linear layer (the pooled penultimate features), which the drift monitor
watches on the device.  torchvision models are always built with ``weights=None``:
nothing is ever downloaded; ``--weights FILE`` loads a local file instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.errors import ConfigError, TrainError

__all__ = ["MODELS", "ModelArgs", "EdgeModel", "TinyCNN", "build_model", "load_weights", "freeze_backbone",
           "count_params", "default_image_size"]

MODELS = ("tiny-cnn", "mobilenet_v3_small", "mobilenet_v2", "resnet18")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild a model's architecture (stored in the checkpoint)."""

    name: str
    num_classes: int
    in_channels: int = 1
    width: float = 1.0
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ConfigError(f"unknown model {self.name!r}", hint=f"choose one of {', '.join(MODELS)}")
        if self.num_classes < 2:
            raise ConfigError(f"model needs at least 2 classes, got {self.num_classes}")
        if self.in_channels not in (1, 3) or (self.name != "tiny-cnn" and self.in_channels != 3):
            raise ConfigError(f"model {self.name} cannot take {self.in_channels} input channel(s)",
                              hint="torchvision models take 3 channels (gray images are replicated)")
        if not 0.1 <= self.width <= 4.0:
            raise ConfigError(f"width {self.width} out of range", hint="use 0.25 .. 2.0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout {self.dropout} out of range", hint="use 0 <= dropout < 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EdgeModel(nn.Module):
    """Base class: subclasses implement :meth:`forward_with_embedding` and name their head."""

    args: ModelArgs
    head_prefix: str  # state_dict prefix of the final linear layer

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_embedding(x)[0]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyCNN(EdgeModel):
    """Five 3x3 conv-BN-ReLU layers, three max-pools, global average pool, dropout, linear.

    About 70k parameters at width 1: small enough for a microcontroller-class device,
    enough for 98% on digits.
    """

    head_prefix = "head."

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        c1, c2, c3 = (max(4, int(round(c * args.width))) for c in (16, 32, 64))
        self.features = nn.Sequential(
            _conv_bn(args.in_channels, c1), _conv_bn(c1, c2), nn.MaxPool2d(2),
            _conv_bn(c2, c2), _conv_bn(c2, c3), nn.MaxPool2d(2),
            _conv_bn(c3, c3), nn.MaxPool2d(2),
        )
        self.dropout = nn.Dropout(args.dropout)
        self.head = nn.Linear(c3, args.num_classes)

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.features(x).mean(dim=(2, 3))
        return self.head(self.dropout(emb)), emb


class _TorchvisionModel(EdgeModel):
    """A torchvision classifier kept intact as ``net`` so its state_dict keys stay the usual
    ones (prefixed ``net.``) and local torchvision weight files load directly."""

    def __init__(self, args: ModelArgs, net: nn.Module, head_prefix: str,
                 split: Callable[[nn.Module, Tensor], tuple[Tensor, Callable[[Tensor], Tensor]]]) -> None:
        super().__init__()
        self.args = args
        self.net = net
        self.head_prefix = head_prefix
        self._split = split

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        emb, head = self._split(self.net, x)
        return head(emb), emb


def _mnv3_split(net: Any, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    f = torch.flatten(net.avgpool(net.features(x)), 1)
    emb = net.classifier[1](net.classifier[0](f))  # Linear 576->1024, Hardswish
    return emb, lambda e: net.classifier[3](net.classifier[2](e))


def _mnv2_split(net: Any, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    emb = torch.flatten(nn.functional.adaptive_avg_pool2d(net.features(x), 1), 1)
    return emb, net.classifier  # Dropout, Linear


def _resnet_split(net: Any, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    emb = torch.flatten(net.avgpool(x), 1)
    return emb, lambda e: net.fc(net.fc_dropout(e))


def _build_mnv3(a: ModelArgs) -> EdgeModel:
    from torchvision.models import mobilenet_v3_small

    net = mobilenet_v3_small(weights=None, num_classes=a.num_classes, width_mult=a.width, dropout=a.dropout)
    return _TorchvisionModel(a, net, "net.classifier.3.", _mnv3_split)


def _build_mnv2(a: ModelArgs) -> EdgeModel:
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2(weights=None, num_classes=a.num_classes, width_mult=a.width, dropout=a.dropout)
    return _TorchvisionModel(a, net, "net.classifier.1.", _mnv2_split)


def _build_resnet18(a: ModelArgs) -> EdgeModel:
    from torchvision.models import resnet18

    if a.width != 1.0:
        raise ConfigError("resnet18 has no width multiplier", hint="leave --width at 1.0")
    net = resnet18(weights=None, num_classes=a.num_classes)
    net.fc_dropout = nn.Dropout(a.dropout)  # parameter-free, so the state_dict keys stay torchvision's
    return _TorchvisionModel(a, net, "net.fc.", _resnet_split)


_BUILDERS: dict[str, Callable[[ModelArgs], EdgeModel]] = {
    "tiny-cnn": TinyCNN,
    "mobilenet_v3_small": _build_mnv3,
    "mobilenet_v2": _build_mnv2,
    "resnet18": _build_resnet18,
}


def build_model(args: ModelArgs) -> EdgeModel:
    """A freshly initialised model (never downloads weights)."""
    model = _BUILDERS[args.name](args)
    # torchvision's MobileNetV3 uses BatchNorm momentum 0.01, tuned for ImageNet's many steps;
    # on a small dataset (~20 steps an epoch) the running statistics never catch up and the
    # eval-mode model predicts one class.  Torch's default 0.1 trains fine and changes no weights.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model


def default_image_size(name: str) -> int:
    """32 for the tiny CNN; 64 for torchvision models (they downsample 32x)."""
    return 32 if name == "tiny-cnn" else 64


def default_normalisation(name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the input: ImageNet's for torchvision models so local pretrained weights fit."""
    if name == "tiny-cnn":
        return (0.5,) * channels, (0.5,) * channels
    return IMAGENET_MEAN, IMAGENET_STD


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _state_from_file(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such weights file", path=path) from None
    except Exception as exc:  # torch raises a zoo of types for corrupt files
        raise TrainError(f"{path}: cannot load weights ({exc})", hint="pass a state_dict or an edgeloop checkpoint.pt",
                         path=path) from exc
    if isinstance(obj, dict) and "model_state" in obj:  # our own checkpoint
        obj = obj["model_state"]
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise TrainError(f"{path}: not a state_dict", hint="pass a state_dict or an edgeloop checkpoint.pt", path=path)
    return obj


def load_weights(model: EdgeModel, source: Path | dict[str, Tensor], *, path: Path | None = None) -> list[str]:
    """Load weights strictly except the head, which is kept when its shape fits.

    Accepts our checkpoints, plain state_dicts with our keys and torchvision-style
    state_dicts (without the ``net.`` prefix).  Returns the head keys that were *not*
    loaded (re-initialised because the class count differs).
    """
    where = path or (source if isinstance(source, Path) else None)
    state = _state_from_file(source) if isinstance(source, Path) else dict(source)
    own = model.state_dict()
    if isinstance(model, _TorchvisionModel) and not any(k.startswith("net.") for k in state):
        state = {"net." + k: v for k, v in state.items()}
    skipped = [k for k in state if k.startswith(model.head_prefix) and k in own and state[k].shape != own[k].shape]
    for k in skipped:
        del state[k]
    missing = [k for k in own if k not in state and not (k.startswith(model.head_prefix) and k in skipped)]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
        raise TrainError(
            f"{where or 'weights'} do not fit {model.args.name} (width {model.args.width}): "
            f"missing [{few(missing)}] unexpected [{few(unexpected)}] wrong shape [{few(bad_shape)}]",
            hint="pass weights saved from the same architecture", path=where)
    model.load_state_dict(state, strict=False)
    return skipped


def freeze_backbone(model: EdgeModel) -> None:
    """Train the head only: every parameter outside ``head_prefix`` stops requiring grad.

    BatchNorm statistics keep updating in train mode; the loop puts frozen BN layers
    in eval mode (see :func:`train.loop.set_train_mode`).
    """
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(model.head_prefix)
