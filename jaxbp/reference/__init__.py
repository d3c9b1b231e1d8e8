"""Plain twins of `jaxbp.layers` and `jaxbp.losses`: same signatures, no custom rule.

JAX differentiates these itself, so `jax.grad` through them is the oracle every
hand-derived rule is checked against. `batch_norm_update` and `batch_norm_inference` (batch
norm's running statistics and evaluation mode) are no twins: plain functions the network uses
as they are, never differentiated by a hand rule.
"""
from jaxbp.reference.activations import leaky_relu, relu, sigmoid, softmax, tanh
from jaxbp.reference.conv import (conv, conv1d, conv2d, conv3d, conv_transpose,
                                  conv_transpose1d, conv_transpose2d, conv_transpose3d)
from jaxbp.reference.dense import dense, flatten
from jaxbp.reference.dropout import dropout
from jaxbp.reference.losses import quadratic, softmax_cross_entropy
from jaxbp.reference.merge import add, fork
from jaxbp.reference.norm import (batch_norm, batch_norm_inference, batch_norm_update,
                                  layer_norm)
from jaxbp.reference.pooling import avg_pool, channel_max, max_pool
from jaxbp.reference.resample import global_avg_pool, upsample

__all__ = [
    "conv", "conv1d", "conv2d", "conv3d",
    "conv_transpose", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "max_pool", "avg_pool", "channel_max",
    "dense", "flatten",
    "sigmoid", "tanh", "relu", "leaky_relu", "softmax",
    "quadratic", "softmax_cross_entropy",
    "global_avg_pool", "upsample", "layer_norm", "batch_norm", "dropout", "fork", "add",
    "batch_norm_update", "batch_norm_inference",
]
