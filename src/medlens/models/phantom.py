"""The demo's small N-D CNN, buildable as the model spec ``medlens.models:phantom_net``."""

from __future__ import annotations

from torch import Tensor, nn

from medlens.errors import MedlensError

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


class PhantomNet(nn.Module):
    """A small N-D CNN: four conv-BN-ReLU blocks (max-pooled between), global average pooling
    and one linear layer.

    The GAP + linear head makes the original CAM applicable. ``features.14`` (the last ReLU, at
    1/8 of the input size) is the layer every CAM method reads by default. Four blocks give a
    receptive field large enough to see a whole lesion's shape; three do not learn the task.
    """

    def __init__(self, num_classes: int = 2, in_channels: int = 1, spatial_dims: int = 2, width: int = 8) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise MedlensError(f"spatial_dims must be 1, 2 or 3; got {spatial_dims}")
        conv, norm, pool = _CONV[spatial_dims], _NORM[spatial_dims], _POOL[spatial_dims]
        widths = (width, 2 * width, 4 * width, 8 * width)
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip((in_channels,) + widths[:-1], widths)):
            layers += [conv(c_in, c_out, 3, padding=1), norm(c_out), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(pool(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(2).mean(2))


def phantom_net(num_classes: int = 2, in_channels: int = 1, spatial_dims: int = 2) -> PhantomNet:
    """Factory for the model spec ``medlens.models:phantom_net``."""
    return PhantomNet(num_classes, in_channels, spatial_dims)
