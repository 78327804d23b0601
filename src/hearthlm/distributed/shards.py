"""A split module's weights: reading and replacing them (a parameter, or a quantized submodule in its place), and
a rank's even run of n items. Slicing a weight is weights/share.py's."""

from __future__ import annotations

from torch import nn

from ..weights.share import Weight


def weight_of(module: nn.Module, name: str = "weight") -> Weight:
    """A module's weight `name` (a Linear's by default): a parameter, or a QuantTensor / RowConcat submodule once
    quantized."""
    return module._parameters[name] if name in module._parameters else module._modules[name]


def set_weight(module: nn.Module, name: str, value: Weight | None) -> None:
    """Put `value` in the place of parameter (or quantized submodule) `name`."""
    module._parameters.pop(name, None)
    module._modules.pop(name, None)
    if value is None or isinstance(value, nn.Module):
        setattr(module, name, value)
    else:
        module.register_parameter(name, nn.Parameter(value, requires_grad=False))


def even(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s [start, end) of n items split evenly (n divisible by world)."""
    part = n // world
    return rank * part, (rank + 1) * part
