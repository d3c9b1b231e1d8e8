"""Layers whose backward pass is a hand-derived `jax.custom_vjp` rule.

Layout as in Flax: activations `(batch, *spatial, channels)`, conv kernels
`(*kernel_spatial, in_channels // groups, out_channels)`, dense weights `(in, out)`.
"""
from jaxbp.layers.activations import leaky_relu, relu, sigmoid, softmax, tanh
from jaxbp.layers.conv import (conv, conv1d, conv2d, conv3d, conv_transpose,
                               conv_transpose1d, conv_transpose2d, conv_transpose3d)
from jaxbp.layers.dense import dense, flatten
from jaxbp.layers.dropout import dropout
from jaxbp.layers.merge import add, fork
from jaxbp.layers.norm import batch_norm, layer_norm
from jaxbp.layers.pooling import avg_pool, channel_max, max_pool
from jaxbp.layers.resample import global_avg_pool, upsample

__all__ = [
    "conv", "conv1d", "conv2d", "conv3d",
    "conv_transpose", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "max_pool", "avg_pool", "channel_max",
    "dense", "flatten",
    "sigmoid", "tanh", "relu", "leaky_relu", "softmax",
    "global_avg_pool", "upsample", "layer_norm", "batch_norm", "dropout", "fork", "add",
]
