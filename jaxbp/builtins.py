"""The built-in primitives, registered exactly as a user registers a layer: one table.

Each entry names the hand rule (`jaxbp.layers`, `jaxbp.losses`), its plain twin
(`jaxbp.reference`), how its parameters are drawn, the checks of its hyperparameters, and
for the benchmark its FLOP model and PyTorch twin (`jaxbp.torch_twins`).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from jaxbp import layers, losses, reference, torch_twins
from jaxbp._spatial import fail, spatial_tuple
from jaxbp.initializers import BIAS_INIT, KERNEL_INIT, initializer
from jaxbp.registry import register_layer, register_loss
from jaxbp.schema import (BOOLEAN, FRACTION, PADDING, POSITIVE, POSITIVE_INT, SIZES, number,
                          optional, spatial_ints)


def _kernel_sizes(layer: str, input_shape, kernel, groups, channels: dict):
    """The kernel's spatial sizes, once the examples have a channel axis and `groups` divides
    each of `channels` (name -> count)."""
    if len(input_shape) < 2:
        raise fail(layer, f"expected examples of shape (*spatial, channels), got shape "
                          f"{input_shape}; set model.input_shape to add a channel axis")
    sizes = spatial_tuple(layer, "kernel", kernel, len(input_shape) - 1)
    # Checked before drawing: channels // groups of 0 breaks the fan-in initialisers.
    if not (isinstance(groups, int) and groups >= 1
            and all(count % groups == 0 for count in channels.values())):
        described = " and ".join(f"the {name} ({count})" for name, count in channels.items())
        raise fail(layer, f"groups must be an int >= 1 dividing {described}, got {groups!r}")
    return sizes


def _conv_kernel(rng, input_shape, dtype, *, features, kernel, groups=1,
                 kernel_init="lecun_normal"):
    """`(*kernel, channels // groups, features)`, drawn by `kernel_init`."""
    sizes = _kernel_sizes("conv", input_shape, kernel, groups,
                          {"input channels": input_shape[-1]})
    shape = (*sizes, input_shape[-1] // groups, features)
    return initializer(kernel_init)(rng, shape, dtype)


def _conv_transpose_kernel(rng, input_shape, dtype, *, features, kernel, groups=1,
                           kernel_init="lecun_normal"):
    """`(*kernel, features // groups, channels)`, the kernel of the conv it transposes (from
    `features` channels to the input's), drawn by `kernel_init`. Its fan-in is read off that
    layout, `features // groups` times the taps, as PyTorch's and Keras's transposed
    convolutions read theirs."""
    sizes = _kernel_sizes("conv_transpose", input_shape, kernel, groups,
                          {"input channels": input_shape[-1], "features": features})
    shape = (*sizes, features // groups, input_shape[-1])
    return initializer(kernel_init)(rng, shape, dtype)


def _dense_kernel(rng, input_shape, dtype, *, features, kernel_init="lecun_normal"):
    """`(in, features)`, drawn by `kernel_init`."""
    if len(input_shape) != 1:
        raise fail("dense", f"expected flat examples of shape (features,), got shape "
                            f"{input_shape}; put a flatten layer before it")
    return initializer(kernel_init)(rng, (input_shape[0], features), dtype)


def _bias(rng, input_shape, dtype, *, features, use_bias=True, bias_init="zeros"):
    """`(features,)` drawn by `bias_init`, or None (no bias) when `use_bias` is false."""
    del input_shape
    return initializer(bias_init)(rng, (features,), dtype) if use_bias else None


def _ones(rng, input_shape, dtype):
    """`(channels,)` ones: a normalisation's scale starts as the identity (and a running
    variance as 1)."""
    del rng
    return jnp.ones((input_shape[-1],), dtype)


def _zeros(rng, input_shape, dtype):
    """`(channels,)` zeros: a normalisation's offset (and a running mean)."""
    del rng
    return jnp.zeros((input_shape[-1],), dtype)


def weighted_macs(input_shape, output_shape, param_shapes) -> int:
    """Multiply-adds of a conv or dense forward: every output meets every entry of its
    kernel slice, `prod(output) * prod(w.shape[:-1])` (groups already in w's shape)."""
    del input_shape
    return math.prod(output_shape) * math.prod(param_shapes["w"][:-1])


def transposed_macs(input_shape, output_shape, param_shapes) -> int:
    """Multiply-adds of a conv_transpose forward: those of the conv it is the adjoint of, whose
    input is this layer's output; every input meets every entry of its kernel slice."""
    return weighted_macs(output_shape, input_shape, param_shapes)


_WEIGHTS = {"features": POSITIVE_INT, "use_bias": BOOLEAN, "kernel_init": KERNEL_INIT,
            "bias_init": BIAS_INIT}
_CONV = {"kernel": SIZES, "stride": SIZES, "padding": PADDING, "dilation": SIZES,
         "groups": POSITIVE_INT}
_POOL = {"window": SIZES, "stride": optional(SIZES), "padding": PADDING}

register_layer("conv", hand=layers.conv, reference=reference.conv,
               params={"w": _conv_kernel, "b": _bias},
               checks={**_WEIGHTS, **_CONV}, flops=weighted_macs, torch=torch_twins.conv)
register_layer("conv_transpose", hand=layers.conv_transpose, reference=reference.conv_transpose,
               params={"w": _conv_transpose_kernel, "b": _bias},
               checks={**_WEIGHTS, **_CONV, "output_padding": spatial_ints(0)},
               flops=transposed_macs, torch=torch_twins.conv_transpose)
register_layer("dense", hand=layers.dense, reference=reference.dense,
               params={"w": _dense_kernel, "b": _bias}, checks=_WEIGHTS,
               flops=weighted_macs, torch=torch_twins.dense)
register_layer("max_pool", hand=layers.max_pool, reference=reference.max_pool, checks=_POOL,
               torch=torch_twins.max_pool)
register_layer("avg_pool", hand=layers.avg_pool, reference=reference.avg_pool, checks=_POOL,
               torch=torch_twins.avg_pool)
register_layer("channel_max", hand=layers.channel_max, reference=reference.channel_max,
               checks={"group_size": POSITIVE_INT})
register_layer("flatten", hand=layers.flatten, reference=reference.flatten,
               torch=torch_twins.flatten)
for _name in ("sigmoid", "tanh", "relu", "softmax"):
    register_layer(_name, hand=getattr(layers, _name), reference=getattr(reference, _name),
                   torch=getattr(torch_twins, _name))
register_layer("leaky_relu", hand=layers.leaky_relu, reference=reference.leaky_relu,
               checks={"negative_slope": number(lambda v: True, "a number")},
               torch=torch_twins.leaky_relu)

register_layer("global_avg_pool", hand=layers.global_avg_pool,
               reference=reference.global_avg_pool, torch=torch_twins.global_avg_pool)
register_layer("upsample", hand=layers.upsample, reference=reference.upsample,
               checks={"factor": SIZES}, torch=torch_twins.upsample)
register_layer("layer_norm", hand=layers.layer_norm, reference=reference.layer_norm,
               params={"scale": _ones, "offset": _zeros}, checks={"eps": POSITIVE},
               torch=torch_twins.layer_norm)
# Training normalises with the batch's statistics and renews the running ones (the state, a
# mean of zeros and a variance of ones at first); evaluation normalises with those.
register_layer("batch_norm", hand=layers.batch_norm, reference=reference.batch_norm,
               params={"scale": _ones, "offset": _zeros},
               state={"mean": _zeros, "var": _ones}, update=reference.batch_norm_update,
               inference=reference.batch_norm_inference,
               checks={"eps": POSITIVE, "momentum": number(lambda v: 0 <= v <= 1,
                                                            "a number in [0, 1]")},
               torch=torch_twins.batch_norm)


def _keep_everything(x):
    """Dropout in evaluation: the inverted scaling already kept the expected value."""
    return x


register_layer("dropout", hand=layers.dropout, reference=reference.dropout,
               inference=_keep_everything, checks={"rate": FRACTION},
               torch=torch_twins.dropout)

register_loss("softmax_cross_entropy", hand=losses.softmax_cross_entropy,
              reference=reference.softmax_cross_entropy, targets="labels",
              forbid_last_layer={"softmax": "loss softmax_cross_entropy takes logits and "
                                            "applies softmax itself; remove this layer or use "
                                            "loss: quadratic"})
register_loss("quadratic", hand=losses.quadratic, reference=reference.quadratic,
              targets="one_hot")
