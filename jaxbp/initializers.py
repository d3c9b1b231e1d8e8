"""Parameter initialisers (`jax.nn.initializers`) by name, as configs and layers spell them.

An initialiser is given as a function `init(key, shape, dtype) -> array`, a name (`"he_normal"`)
or a mapping `{"name": "normal", "stddev": 0.1}`; `initializer` turns any of them into the
function. `KERNEL_INIT` and `BIAS_INIT` are the checks of those values (`jaxbp.schema`): a bias
vector has no fan-in or fan-out, so the variance-scaling family is for kernels only.
"""
from __future__ import annotations

from typing import Any, Callable

from jax.nn.initializers import (constant, glorot_normal, glorot_uniform, he_normal, he_uniform,
                                 lecun_normal, lecun_uniform, normal, ones, truncated_normal,
                                 uniform, variance_scaling, zeros)

from jaxbp.schema import POSITIVE, Check, Key, choice, number, tagged

__all__ = [
    "KERNEL_INITIALIZERS", "BIAS_INITIALIZERS", "KERNEL_INIT", "BIAS_INIT", "initializer",
    "constant", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform", "lecun_normal",
    "lecun_uniform", "normal", "ones", "truncated_normal", "uniform", "variance_scaling", "zeros",
]

BIAS_INITIALIZERS = {
    "zeros": {},
    "ones": {},
    "constant": {"value": Key(number(lambda v: True, "a number"), 0.0)},
    "normal": {"stddev": Key(POSITIVE, 0.01)},
    "uniform": {"scale": Key(POSITIVE, 0.01)},
    "truncated_normal": {"stddev": Key(POSITIVE, 0.01)},
}
KERNEL_INITIALIZERS = {
    **BIAS_INITIALIZERS,
    **{name: {} for name in ("lecun_normal", "lecun_uniform", "glorot_normal", "glorot_uniform",
                             "he_normal", "he_uniform")},
    "variance_scaling": {
        "scale": Key(POSITIVE, 1.0),
        "mode": Key(choice(("fan_in", "fan_out", "fan_avg"), "mode"), "fan_in"),
        "distribution": Key(choice(("truncated_normal", "normal", "uniform"), "distribution"),
                            "truncated_normal"),
    },
}

_FACTORIES = {
    "zeros": lambda: zeros,
    "ones": lambda: ones,
    "constant": constant,
    "normal": normal,
    "uniform": uniform,
    "truncated_normal": truncated_normal,
    "lecun_normal": lecun_normal,
    "lecun_uniform": lecun_uniform,
    "glorot_normal": glorot_normal,
    "glorot_uniform": glorot_uniform,
    "he_normal": he_normal,
    "he_uniform": he_uniform,
    "variance_scaling": variance_scaling,
}


def _spec_or_function(variants: dict, noun: str) -> Check:
    """A function as it is; a name or mapping checked against `variants`."""
    spec = tagged("name", variants, noun, shorthand=True)
    return Check(lambda path, value: value if callable(value) else spec.fn(path, value),
                 f"a function or {spec.what}")


KERNEL_INIT = _spec_or_function(KERNEL_INITIALIZERS, "initialiser")
BIAS_INIT = _spec_or_function(BIAS_INITIALIZERS, "bias initialiser")


def initializer(spec: Any) -> Callable:
    """`{"name": "normal", "stddev": 0.1}` (or `"he_normal"`, or a function) -> the function.

    `spec` is assumed checked (`KERNEL_INIT`); unchecked keys go to the factory as they are.
    """
    if callable(spec):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    return _FACTORIES[spec["name"]](**{k: v for k, v in spec.items() if k != "name"})
