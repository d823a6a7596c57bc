"""The networks ``models.build_model`` knows by name, all taking float tensors ``(n, C, H, W)`` in
``[0, 1]`` and returning logits ``(n, num_classes)``; each is built as
``builder(in_channels=, num_classes=, image_size=)``.

- ``LeNet5`` (``lenet5``): LeNet-5 (LeCun et al. 1998) with the modern swaps: ReLU and max-pool
  instead of tanh and average-pool. conv5x5-6 (padding 2, so a 28x28 input keeps its size as in
  the original 32x32 design), maxpool2, conv5x5-16 (valid), maxpool2, fc-120, fc-84, fc-classes.
- ``C3F2`` (``c3f2``): the paper's MNIST CNN (the Carlini & Wagner MNIST model): conv3x3-32,
  conv3x3-32, maxpool2, conv3x3-64, conv3x3-64, maxpool2, fc-200, fc-200, fc-classes. Valid (no)
  padding, ReLU after every conv and hidden fc, dropout ``p=0.5`` after each fc-200's ReLU (off
  in eval mode). 28x28 input -> 4x4x64 = 1024 features.
- ``DNN5`` (``dnn5``): five fully connected layers: flatten, 512, 256, 128, 64 (ReLU), classes.
- ``resnet(18)``, ``resnet(152)``, ``InceptionV3`` (``resnet18``, ``resnet152``,
  ``inception_v3``): torchvision's architectures, randomly initialised (``weights=None``: nothing
  is downloaded). The first convolution takes ``in_channels``; for images under 64 px the
  ResNets use the CIFAR stem (conv3x3 stride 1, no max-pool) so 28-32 px inputs are not
  downsampled away; Inception-v3 resizes its input to at least 75 px (its smallest valid size),
  without auxiliary logits.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

DNN5_WIDTHS = (512, 256, 128, 64)


def _conv_out(size: int, kernel: int, padding: int = 0) -> int:
    return size + 2 * padding - kernel + 1


class LeNet5(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        s = _conv_out(image_size, 5, 2) // 2
        s = _conv_out(s, 5) // 2
        if s < 1:
            raise ValueError(f"lenet5: image_size={image_size} is too small (needs >= 12)")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * s * s, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class C3F2(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 dropout: float = 0.5):
        super().__init__()
        s = _conv_out(_conv_out(image_size, 3), 3) // 2
        s = _conv_out(_conv_out(s, 3), 3) // 2
        if s < 1:
            raise ValueError(f"c3f2: image_size={image_size} is too small (needs >= 16)")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * s * s, 200), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(200, 200), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(200, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DNN5(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 widths: tuple[int, ...] = DNN5_WIDTHS):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for w in widths:
            layers += [nn.Linear(width, w), nn.ReLU()]
            width = w
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def resnet(depth: int):
    """A builder of torchvision's ResNet-``depth`` (CIFAR stem under 64 px, see the module doc)."""
    def build(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)
        small = image_size < 64
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3 if small else 7, stride=1 if small else 2,
                              padding=1 if small else 3, bias=False)
        if small:
            net.maxpool = nn.Identity()
        return net

    return build


class InceptionV3(nn.Module):
    """torchvision's Inception-v3 (no aux logits) on inputs resized to at least 75 px."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.size = max(75, image_size)
        self.net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True,
                                                   num_classes=num_classes, transform_input=False)
        if in_channels != 3:
            self.net.Conv2d_1a_3x3.conv = nn.Conv2d(in_channels, 32, kernel_size=3, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x)
