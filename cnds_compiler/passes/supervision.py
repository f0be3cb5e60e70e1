"""Supervision points attach to convolutional feature maps, at or before the last convolution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import SupervisionError
from ..ir import Network


@dataclass(frozen=True)
class CheckSupervision:
    """A branch taps a CxHxW map no later than the last conv layer (the paper's branches sit after conv 4)."""

    name: ClassVar[str] = "check-supervision"
    requires: ClassVar[tuple[str, ...]] = ("verify",)  # taps name trunk layers

    def apply(self, net: Network) -> Network:
        conv_positions = [i for i, layer in enumerate(net.trunk) if layer.is_conv]
        for b in net.branches:
            i = net.layer_index(b.tap)
            if not conv_positions or i > conv_positions[-1]:
                last = net.trunk[conv_positions[-1]].name if conv_positions else None
                where = f"after the last convolution ('{last}')" if last else "in a network without convolutions"
                raise SupervisionError(
                    f"branch attached to '{b.tap}', {where}; supervision points tap convolutional feature maps",
                    b.span,
                    hint=f"attach it to '{last}' or an earlier conv layer" if last else None,
                )
        return net
