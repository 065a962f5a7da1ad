"""blip.models' architecture options: the authors' AlexNet fc widths and dropouts, and
ResNet-18's top-left pooling window (MI/networks/q_resnet.py:77, ``F.avg_pool2d(out, 4)``).

Sources: github.com/Yujun-Shi/BLIP at commit 975e6dbc; ``IC/`` = ``ImageClassification/src/``,
``MI/`` = ``miniImageNetClassification/src/``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip.models import AlexNet, ResNet18


def _dropout_inputs(net: AlexNet, x: Tensor) -> dict[str, list[tuple[int, ...]]]:
    """The shapes each of the net's dropout modules is applied to in one forward pass."""
    seen: dict[str, list[tuple[int, ...]]] = {}
    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, nn.Dropout):
            seen[name] = []
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: seen[name].append(tuple(inp[0].shape))))
    net(x, 0)
    for h in hooks:
        h.remove()
    return seen


def test_alexnet_dropouts_sit_where_the_authors_drop1_and_drop2_do() -> None:
    # MI/networks/q_alexnet.py:33-34, 40-45: drop1 (0.2) after conv1 and conv2, drop2 (0.5)
    # after conv3, fc1 and fc2
    net = AlexNet((3, 84, 84), [5], width=0.125, fc1_width=32, fc2_width=16, fc_dropout=0.5)
    seen = _dropout_inputs(net, torch.randn(2, 3, 84, 84))
    by_p = {net.get_submodule(name).p: shapes for name, shapes in seen.items()}
    c1, c2, c3 = net.conv1.out_channels, net.conv2.out_channels, net.conv3.out_channels
    assert [s[1] for s in by_p[0.2]] == [c1, c2]  # after conv1, conv2
    assert [s[1] for s in by_p[0.5]] == [c3, 32, 16]  # after conv3, fc1, fc2
    assert net.heads[0].in_features == 16


def test_alexnet_defaults_are_unchanged() -> None:
    # fc 2048 x width both, dropout 0.2 everywhere (the authors' mixture5 net,
    # IC/networks/q_alexnet.py:33-38)
    net = AlexNet((3, 32, 32), [10], width=0.5)
    assert (net.fc1.out_features, net.fc2.out_features) == (1024, 1024)
    assert {m.p for m in net.modules() if isinstance(m, nn.Dropout)} == {0.2}
    fixed = AlexNet((3, 32, 32), [10], width=2.0, fc1_width=2048, fc2_width=2048)
    assert (fixed.fc1.out_features, fixed.fc2.out_features) == (2048, 2048)
    assert fixed.conv3.out_channels == 512  # the convs still scale by width


def _final_map(net: ResNet18, x: Tensor) -> Tensor:
    return net.layers(F.relu(net.bn1(net.conv1(x))))


def test_resnet_pool_window_is_the_authors_avg_pool2d() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 3, 84, 84)
    net = ResNet18((3, 84, 84), [5], width=0.125, pool_window=4).eval()
    out = _final_map(net, x)
    assert out.shape[-2:] == (6, 6)  # 84 -> 42 -> 42 -> 21 -> 11 -> 6
    feats = net.features(x)
    # the authors' op, then their view (MI/networks/q_resnet.py:77-78)
    authors = F.avg_pool2d(out, 4).view(out.size(0), -1)
    assert torch.equal(feats, authors)
    torch.testing.assert_close(feats, out[..., :4, :4].mean(dim=(2, 3)))
    whole = ResNet18((3, 84, 84), [5], width=0.125).eval()
    whole.load_state_dict(net.state_dict())
    torch.testing.assert_close(whole.features(x), out.mean(dim=(2, 3)))
    assert not torch.allclose(whole.features(x), feats)


def test_resnet_pool_window_ignores_the_last_rows_and_columns() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 84, 84)

    def poison(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
        out = out.clone()
        out[..., 4:, :] = 1e3  # outside the top-left 4 x 4 window
        out[..., :, 4:] = -1e3
        return out

    for window, changes in ((4, False), (None, True)):
        net = ResNet18((3, 84, 84), [5], width=0.125, pool_window=window).eval()
        clean = net.features(x)
        h = net.layers.register_forward_hook(poison)
        poisoned = net.features(x)
        h.remove()
        assert torch.equal(clean, poisoned) is not changes, window


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(pool_window=7), r"pool_window must be an int >= 1 and <= 6"),
    (dict(pool_window=0), r"pool_window"),
    (dict(pool_window=2.0), r"pool_window"),
])
def test_resnet_pool_window_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ResNet18((3, 84, 84), [5], width=0.125, **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(fc1_width=0), "fc1_width"), (dict(fc2_width=True), "fc2_width"),
    (dict(fc2_width=51.2), "fc2_width"), (dict(fc_dropout=1.0), "fc_dropout"),
    (dict(fc_dropout=float("nan")), "fc_dropout"), (dict(dropout=-0.1), "dropout"),
])
def test_alexnet_options_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AlexNet((3, 32, 32), [10], width=0.125, **kwargs)
