"""PyTorch twins of the built-in layers, for the side-by-side benchmark.

Each builder takes the `torch` module (never imported here, so jaxbp does not need it), one
example's channels-last input shape and the layer's hyperparameters, and returns the
`torch.nn.Module` computing the same function in PyTorch's channels-first layout. A layer
without an equivalent raises `Unsupported`.
"""
from __future__ import annotations

import math

import jax

from jaxbp._spatial import spatial_tuple
from jaxbp.reference.conv import conv_geometry, transpose_geometry


class Unsupported(Exception):
    """The layer, with these hyperparameters, has no PyTorch equivalent."""


def _rank(input_shape) -> int:
    return len(input_shape) - 1


def _padding(padding, stride, rank: int):
    """PyTorch's padding argument for ours: both sides equal, or "same" at stride 1."""
    if padding == "VALID":
        return 0
    if padding == "SAME" and stride in (1, (1,) * rank):
        return "same"
    if isinstance(padding, int):
        return padding
    if isinstance(padding, tuple) and all(lo == hi for lo, hi in padding):
        return tuple(lo for lo, _ in padding)
    raise Unsupported(f"padding {padding!r} with stride {stride!r}")


def conv(torch, input_shape, *, features, kernel, stride, padding, dilation, groups, use_bias):
    """`Conv{1,2,3}d`; where our padding is uneven (SAME with a stride, say), a
    `ConstantPad{1,2,3}d` with the resolved pairs in front of an unpadded conv."""
    rank = _rank(input_shape)
    module = getattr(torch.nn, f"Conv{rank}d")
    try:
        return module(input_shape[-1], features, kernel, stride,
                      _padding(padding, stride, rank), dilation, groups, bias=use_bias)
    except Unsupported:
        sizes = spatial_tuple("conv", "kernel", kernel, rank)
        x = jax.ShapeDtypeStruct((1, *input_shape), "float32")
        w = jax.ShapeDtypeStruct((*sizes, input_shape[-1] // groups, features), "float32")
        pads = conv_geometry("conv", rank, x, w, None, stride, padding, dilation, groups).pads
        # PyTorch lists the pads from the last axis back: (lo_last, hi_last, lo_prev, ...).
        flat = tuple(side for pair in reversed(pads) for side in pair)
        return torch.nn.Sequential(
            getattr(torch.nn, f"ConstantPad{rank}d")(flat, 0.0),
            module(input_shape[-1], features, sizes, stride, 0, dilation, groups,
                   bias=use_bias))


def conv_transpose(torch, input_shape, *, features, kernel, stride, padding, dilation, groups,
                   output_padding, use_bias):
    """`ConvTranspose{1,2,3}d` with our resolved padding and output_padding ("SAME" implies
    one); PyTorch pads both ends of an axis alike, so uneven pairs are `Unsupported`."""
    rank = _rank(input_shape)
    kernel = spatial_tuple("conv_transpose", "kernel", kernel, rank)
    y = jax.ShapeDtypeStruct((1, *input_shape), "float32")
    w = jax.ShapeDtypeStruct((*kernel, features // groups, input_shape[-1]), "float32")
    geometry = transpose_geometry("conv_transpose", rank, y, w, None, stride, padding, dilation,
                                  groups, output_padding)
    if any(lo != hi for lo, hi in geometry.pads):
        raise Unsupported(f"conv_transpose padding {padding!r} (uneven: {geometry.pads})")
    module = getattr(torch.nn, f"ConvTranspose{rank}d")
    return module(input_shape[-1], features, kernel, stride,
                  tuple(lo for lo, _ in geometry.pads), geometry.output_padding, groups,
                  bias=use_bias, dilation=dilation)


def _pool(kind: str):
    def build(torch, input_shape, *, window, stride, padding):
        if padding != "VALID":
            raise Unsupported(f"{kind.lower()}_pool padding {padding!r}")
        return getattr(torch.nn, f"{kind}Pool{_rank(input_shape)}d")(window, stride)
    return build


max_pool, avg_pool = _pool("Max"), _pool("Avg")


def dense(torch, input_shape, *, features, use_bias):
    return torch.nn.Linear(math.prod(input_shape), features, bias=use_bias)


def flatten(torch, input_shape):
    return torch.nn.Flatten()


def _elementwise(name: str, *args):
    return lambda torch, input_shape: getattr(torch.nn, name)(*args)


relu, sigmoid, tanh, softmax = (_elementwise("ReLU"), _elementwise("Sigmoid"),
                                _elementwise("Tanh"), _elementwise("Softmax", -1))


def leaky_relu(torch, input_shape, *, negative_slope):
    return torch.nn.LeakyReLU(negative_slope)


def global_avg_pool(torch, input_shape):
    pool = getattr(torch.nn, f"AdaptiveAvgPool{_rank(input_shape)}d")(1)
    return torch.nn.Sequential(pool, torch.nn.Flatten())


def upsample(torch, input_shape, *, factor):
    return torch.nn.Upsample(scale_factor=factor, mode="nearest")


def layer_norm(torch, input_shape, *, eps):
    if len(input_shape) != 1:  # ours normalises the channels, the last axis of NHWC
        raise Unsupported("layer_norm over the channels of a channels-first map")
    return torch.nn.LayerNorm(input_shape[0], eps=eps)


def batch_norm(torch, input_shape, *, eps, momentum):
    # PyTorch's momentum weighs the new batch, ours (Flax's) the old running value.
    rank = max(_rank(input_shape), 1)  # a flat (C,) example is BatchNorm1d's (N, C)
    if rank > 3:
        raise Unsupported(f"batch_norm over {rank} spatial axes")
    return getattr(torch.nn, f"BatchNorm{rank}d")(input_shape[-1], eps=eps,
                                                  momentum=1 - momentum)


def dropout(torch, input_shape, *, rate):
    return torch.nn.Dropout(rate)


def residual(torch, main, shortcut):
    """`main(x) + shortcut(x)` of two twins (an empty Sequential is the identity)."""
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.main, self.shortcut = main, shortcut

        def forward(self, x):
            return self.main(x) + self.shortcut(x)

    return Residual()
