"""The models the benchmarks share, and parameter counts.

:class:`MnistNet` is the CNN of PyTorch's MNIST example, layer for layer the ``Net`` of ``examples/mnist/demo.py``
(same layers, created in the same order, so the same seed gives the same weights); the example keeps its own copy
so that it stays a single self-contained file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MnistNet", "TabularMLP", "UNet", "dense_params", "n_params", "trainable"]


class MnistNet(nn.Module):
    """The CNN of PyTorch's MNIST example (pytorch/examples, mnist/main.py), with adjustable widths."""

    def __init__(self, c1: int = 32, c2: int = 64, hidden: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, 1)
        self.conv2 = nn.Conv2d(c1, c2, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(c2 * 12 * 12, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


class TabularMLP(nn.Module):
    """The breast-cancer MLP, ``n_in``-32-16-2 (ReLU) at width 1."""

    def __init__(self, width: float = 1.0, n_in: int = 30):
        super().__init__()
        h1, h2 = max(1, round(32 * width)), max(1, round(16 * width))
        self.net = nn.Sequential(nn.Linear(n_in, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 2))

    def forward(self, x):
        return self.net(x)


class UNet(nn.Module):
    """A small UNet (two down, two up, skip connections; nearest upsampling) for 2-class segmentation."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        c = max(2, round(8 * width))

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU())

        self.enc1, self.enc2, self.mid = block(1, c), block(c, 2 * c), block(2 * c, 4 * c)
        self.dec2, self.dec1 = block(6 * c, 2 * c), block(3 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.out(d1)


def n_params(model: nn.Module) -> int:
    """Every parameter, frozen ones included."""
    return sum(p.numel() for p in model.parameters())


def trainable(model: nn.Module) -> int:
    """The parameters that train (``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def dense_params(*widths: int) -> int:
    """The parameter count of a stack of Linear layers (with biases) through ``widths``.

    Example:
        >>> dense_params(784, 64, 10)  # 785 * 64 + 65 * 10
        50890
    """
    return sum((a + 1) * b for a, b in zip(widths, widths[1:]))
