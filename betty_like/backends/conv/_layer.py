"""``AlgorithmConv2d``: an ``nn.Conv2d`` whose forward runs the algorithm its selector picks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import Selector, algorithm

# the per-module hook tables of nn.Module, shared with the replaced layer so its hooks keep firing
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class AlgorithmConv2d(nn.Conv2d):
    """A drop-in ``nn.Conv2d`` holding the replaced layer's own parameter objects.

    Being a ``Conv2d`` with the same ``weight``/``bias`` attributes, it keeps ``isinstance`` checks,
    ``state_dict`` keys, optimizers and ``torch.func.functional_call`` working. Its forward reads
    the parameters at call time and hands them to the selected algorithm.

    Attributes:
        selector: decides the algorithm per input (see :mod:`betty_like.backends.registry`).
        label: the layer's path in the swapped model, for messages and :func:`choice_table`.
    """

    def __init__(self, layer: nn.Conv2d, selector: Selector, label: str) -> None:
        super().__init__(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device="meta",  # placeholders only: the real parameters are the layer's own, assigned next
        )
        self.weight = layer.weight
        self.bias = layer.bias
        self.train(layer.training)
        for table in _HOOK_TABLES:
            if table in layer.__dict__:
                self.__dict__[table] = layer.__dict__[table]
        self.selector = selector
        self.label = label

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        y = algorithm("conv2d", self.selector.choose(self, x)).impl(self, x, self.weight, self.bias)
        return y.squeeze(0) if unbatched else y


def wrap(layer: nn.Conv2d, selector: Selector, label: str) -> AlgorithmConv2d:
    """The registry's constructor for the ``conv2d`` op."""
    if torch.nn.utils.parametrize.is_parametrized(layer):
        raise TypeError(
            f"layer {label!r} is parametrized (e.g. weight_norm), so its weight is computed on each call; "
            "remove the parametrization before swapping"
        )
    return AlgorithmConv2d(layer, selector, label)
