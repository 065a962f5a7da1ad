"""Multi-head models for task-incremental learning, built from plain ``nn`` layers.

Each model has a shared trunk and one ``nn.Linear`` head per task in ``self.heads``;
``forward(x, task)`` returns that task's logits. Trunk Linear/Conv2d layers are
initialised as the authors' quantized layers (N(0, 1/fan_in) clamped to
±6/sqrt(fan_in), zero bias) so every method starts from the same weights and
``blip.convert(model, exclude=("heads",))`` copies them unchanged. Heads keep
PyTorch's default init, as in the authors' code.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import validate
from .nn import blip_init_


def _check_classes(classes_per_task: Sequence[int]) -> list[int]:
    classes = list(classes_per_task)
    if not classes or not all(isinstance(c, int) and c >= 1 for c in classes):
        raise ValueError(f"classes_per_task must be a non-empty list of ints >= 1; "
                         f"got {classes_per_task!r}")
    return classes


def _check_conv_args(in_shape: Sequence[int], classes_per_task: Sequence[int],
                     width: float) -> list[int]:
    """The conv nets' shared argument checks; returns the classes per task."""
    if len(in_shape) != 3:
        raise ValueError(f"in_shape must be (channels, height, width); got {in_shape!r}")
    _check_width(width)
    return _check_classes(classes_per_task)


def _check_width(width: float) -> None:
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number; got {width!r}")


def _init_trunk(trunk: nn.Module) -> None:
    for m in trunk.modules():
        if type(m) in (nn.Linear, nn.Conv2d):
            blip_init_(m)


class MultiHead(nn.Module, abc.ABC):
    """Base: ``features(x)`` (the trunk) and ``self.heads``; ``forward(x, task)``."""

    heads: nn.ModuleList

    @abc.abstractmethod
    def features(self, x: Tensor) -> Tensor:
        """The shared trunk's output for ``x``."""

    def forward(self, x: Tensor, task: int) -> Tensor:
        if not (isinstance(task, int) and 0 <= task < len(self.heads)):
            raise ValueError(f"task must be an int in 0..{len(self.heads) - 1}; got {task!r}")
        return self.heads[task](self.features(x))

    @property
    def num_tasks(self) -> int:
        return len(self.heads)


class MLP(MultiHead):
    """``in -> hidden (ReLU) [-> hidden (ReLU)]* -> head[task]``; input is flattened."""

    def __init__(
        self,
        in_features: int | Sequence[int],
        hidden: int = 100,
        classes_per_task: Sequence[int] = (10,),
        n_hidden_layers: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(in_features, int):
            in_features = int(torch.Size(in_features).numel())
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1; got {in_features!r}")
        if not (isinstance(hidden, int) and hidden >= 1):
            raise ValueError(f"hidden must be an int >= 1; got {hidden!r}")
        if not (isinstance(n_hidden_layers, int) and n_hidden_layers >= 1):
            raise ValueError(f"n_hidden_layers must be an int >= 1; got {n_hidden_layers!r}")
        classes = _check_classes(classes_per_task)
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.in_features = in_features
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(hidden, c) for c in classes)
        _init_trunk(self.trunk)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x.reshape(x.shape[0], -1))


def _conv_out(size: int, k: int) -> int:
    return size - k + 1


class AlexNet(MultiHead):
    """The authors' AlexNet-style net: 3 convs (64/128/256 channels times ``width``,
    kernels size//8, size//10, 2), each ReLU -> dropout -> max-pool 2; then fc1, fc2 with
    ReLU and dropout.

    Dropout: ``dropout`` after conv1 and conv2, ``fc_dropout`` (default: ``dropout``) after
    conv3, fc1 and fc2, the places of the authors' drop1 and drop2. fc widths: ``fc1_width``
    and ``fc2_width`` (default: 2048 x ``width`` each, as their mixture5 net). Their three
    nets: mixture5 the defaults (IC/networks/q_alexnet.py:36-38), cifar fc 2048 -> 2048
    whatever --mul (q_alexnet.py:39-41), mini-ImageNet fc 2048 -> 512 and drop2 0.5
    (MI/networks/q_alexnet.py:34-37); see blip.classification.presets.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (3, 32, 32),
        classes_per_task: Sequence[int] = (10,),
        width: float = 1.0,
        dropout: float = 0.2,
        fc1_width: int | None = None,
        fc2_width: int | None = None,
        fc_dropout: float | None = None,
    ) -> None:
        super().__init__()
        classes = _check_conv_args(in_shape, classes_per_task, width)
        for name, p in (("dropout", dropout), ("fc_dropout", fc_dropout)):
            if p is not None:
                validate.number(name, p, lo=0.0, hi=1.0, hi_open=True)
        fc_default = max(1, round(2048 * width))
        fc1 = fc_default if fc1_width is None else validate.number("fc1_width", fc1_width,
                                                                    lo=1, integer=True)
        fc2 = fc_default if fc2_width is None else validate.number("fc2_width", fc2_width,
                                                                    lo=1, integer=True)
        ch, size = int(in_shape[0]), int(in_shape[1])
        k1, k2 = max(size // 8, 1), max(size // 10, 1)
        c1, c2, c3 = (max(1, round(c * width)) for c in (64, 128, 256))
        s = _conv_out(size, k1) // 2
        s = _conv_out(s, k2) // 2
        s = _conv_out(s, 2) // 2
        if s < 1:
            raise ValueError(f"in_shape {tuple(in_shape)} is too small for AlexNet")
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(ch, c1, k1), nn.Conv2d(c1, c2, k2), \
            nn.Conv2d(c2, c3, 2)
        self.fc1, self.fc2 = nn.Linear(c3 * s * s, fc1), nn.Linear(fc1, fc2)
        self.drop = nn.Dropout(dropout)
        self.drop_fc = nn.Dropout(dropout if fc_dropout is None else fc_dropout)
        self.heads = nn.ModuleList(nn.Linear(fc2, c) for c in classes)
        for layer in (self.conv1, self.conv2, self.conv3, self.fc1, self.fc2):
            blip_init_(layer)

    def features(self, x: Tensor) -> Tensor:
        h = x
        for conv, drop in ((self.conv1, self.drop), (self.conv2, self.drop),
                           (self.conv3, self.drop_fc)):
            h = F.max_pool2d(drop(F.relu(conv(h))), 2)
        h = h.flatten(1)
        h = self.drop_fc(F.relu(self.fc1(h)))
        return self.drop_fc(F.relu(self.fc2(h)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, affine=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, affine=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, affine=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _resnet_map_size(size: int) -> int:
    """Side of ResNet18's final feature map for a ``size`` x ``size`` input: the stem and
    three blocks halve it (3x3 convs, padding 1, stride 2)."""
    for _ in range(4):
        size = (size - 1) // 2 + 1
    return size


class ResNet18(MultiHead):
    """ResNet-18 as the authors use it: bias-free convs, ``BatchNorm2d(affine=False)``
    (no learnable norm parameters to protect), stem conv 3x3 stride 2, blocks
    [2, 2, 2, 2] of 64/128/256/512 channels (times ``width``), average pool.

    ``pool_window=None`` averages the whole final map. ``pool_window=k`` averages only its
    top-left k x k window: it reproduces the authors' ``F.avg_pool2d(out, 4)``
    (MI/networks/q_resnet.py:77), which on the 6 x 6 map of an 84 x 84 image has a single
    window, at the top left, and drops the last two rows and columns (``view`` then
    flattens its 1 x 1 output).

    The BatchNorm running statistics are shared across tasks, as in the authors' code.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (3, 84, 84),
        classes_per_task: Sequence[int] = (5,),
        width: float = 1.0,
        pool_window: int | None = None,
    ) -> None:
        super().__init__()
        classes = _check_conv_args(in_shape, classes_per_task, width)
        side = min(_resnet_map_size(int(in_shape[1])), _resnet_map_size(int(in_shape[2])))
        if pool_window is not None:
            validate.number("pool_window", pool_window, lo=1, hi=side, integer=True,
                            where=f"ResNet18 on {tuple(in_shape)} (final map side {side}): ")
        self.pool_window = pool_window
        planes = [max(1, int(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(int(in_shape[0]), planes[0], 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0], affine=False)
        blocks: list[nn.Module] = []
        cin = planes[0]
        for i, p in enumerate(planes):
            for j in range(2):
                blocks.append(_BasicBlock(cin, p, 2 if (i > 0 and j == 0) else 1))
                cin = p
        self.layers = nn.Sequential(*blocks)
        self.heads = nn.ModuleList(nn.Linear(cin, c) for c in classes)
        _init_trunk(self.conv1)
        _init_trunk(self.layers)

    def features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        if self.pool_window is None:
            return F.adaptive_avg_pool2d(out, 1).flatten(1)
        k = self.pool_window
        return F.avg_pool2d(out[..., :k, :k], k).flatten(1)


__all__ = ["MLP", "AlexNet", "MultiHead", "ResNet18"]
