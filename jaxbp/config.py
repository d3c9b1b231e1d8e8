"""Experiment configs: YAML files, their schema, validation and `--set` overrides.

A config has five sections. Keys marked REQUIRED have no default; every other
key may be left out and gets the default in brackets. Unknown keys are errors.

    model:
      input_shape: [null] shape of one example as the model sees it; null means
        the data set's. Otherwise it must hold as many values as the data set's
        examples, which are reshaped to it (e.g. [40, 1] for a 1-D conv).
      layers: REQUIRED, a non-empty list; each item has a `type` and its keys:
        conv: features REQUIRED, kernel REQUIRED (int, or one int per spatial
          axis), stride [1], padding [VALID], dilation [1], groups [1],
          use_bias [true], kernel_init [lecun_normal], bias_init [zeros]
        dense: features REQUIRED, use_bias [true], kernel_init [lecun_normal],
          bias_init [zeros]
        max_pool, avg_pool: window REQUIRED (int or list), stride [null: the
          window], padding [VALID]
        channel_max: group_size REQUIRED (max over runs of that many channels)
        leaky_relu: negative_slope [0.01]
        flatten, sigmoid, tanh, relu, softmax: no keys
      padding is VALID, SAME (any case), an int p (p zeros both sides of every
      spatial axis, as PyTorch's padding=p) or one [low, high] pair per axis.
      An initialiser (`jax.nn.initializers`) is a name or {name: ..., its keys}:
      zeros, ones, constant {value [0.0]}, normal {stddev [0.01]},
      uniform {scale [0.01]} (on [0, scale)), truncated_normal {stddev [0.01]},
      and, for kernels only, lecun_normal, lecun_uniform, glorot_normal,
      glorot_uniform, he_normal, he_uniform, variance_scaling {scale [1.0],
      mode [fan_in] | fan_out | fan_avg, distribution [truncated_normal] |
      normal | uniform} (PyTorch's default is scale 1/3, uniform).
    loss: REQUIRED, softmax_cross_entropy (on logits, so the net must not end
      in a softmax layer) or quadratic (1/2 |out - one_hot|^2).
    optimizer:
      name: REQUIRED, sgd | momentum | nesterov | adam | adamw
      learning_rate: REQUIRED, > 0; the peak of the schedule
      momentum [0.9] (momentum, nesterov); b1 [0.9], b2 [0.999], eps [1e-8]
      (adam, adamw); weight_decay [1e-4] (adamw)
      schedule [constant]: a name or {name: ..., its keys}, lengths in epochs:
        constant; cosine {alpha [0.0]: final fraction of learning_rate};
        exponential {decay_rate [0.9] per epoch, staircase [false]};
        warmup_cosine {warmup_epochs [1], alpha [0.0]} (linear from 0);
        piecewise {boundaries REQUIRED (epochs), scales REQUIRED (factor
        applied at each boundary)}
    data:
      name: REQUIRED, a name in `jaxbp.data.DATASETS`
      batch_size [128]; normalize [standardize] | scale | none;
      dir [null]: folder of the source files (idx files for the images);
      data_dir [null]: where prepared data is cached;
      limit_train [null], limit_test [null]: use only the first N examples
    train:
      epochs [10], seed [0], precision [float32] | float64,
      eval_every [1] (epochs between test evaluations),
      checkpoint_every [1] (epochs between checkpoints; 0: none)

`load_config` checks all of this. Shape checks that need the data set's shape
(kernels that do not fit, the last layer's size) happen in
`jaxbp.nn.build_model`, which raises the same `ConfigError`.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from typing import Any, Callable, Iterable, NamedTuple

import yaml

from jaxbp.data import DATASETS


class ConfigError(ValueError):
    """A problem in a config, as one line naming the key (e.g. `optimizer.learning_rate`)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


class Check(NamedTuple):
    """Validates and normalises one value: `fn(path, value) -> value`; `what` says what it wants."""
    fn: Callable[[str, Any], Any]
    what: str


class Key(NamedTuple):
    """One key of a section: how to check it and its default (`REQUIRED` for none)."""
    check: Check
    default: Any


REQUIRED = object()


# ---------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads `1e-3` and `5e3` as floats (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def parse_value(text: str) -> Any:
    """Parses one `--set` value as a YAML scalar (or flow list/mapping); '' is null."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse value {text!r} as YAML: {_yaml_problem(err)}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or err}{where}"


# ---------------------------------------------------------------- checks

def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _expected(path: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {what}, {_got(value)}")


def _suggest(word: Any, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(test: Callable[[int], bool], what: str) -> Check:
    def fn(path, value):
        if not (_is_int(value) and test(value)):
            raise _expected(path, what, value)
        return value
    return Check(fn, what)


def number(test: Callable[[float], bool], what: str) -> Check:
    def fn(path, value):
        if not (_is_number(value) and test(value)):
            raise _expected(path, what, value)
        return float(value)
    return Check(fn, what)


def _boolean_fn(path, value):
    if not isinstance(value, bool):
        raise _expected(path, "true or false", value)
    return value


def _string_fn(path, value):
    if not isinstance(value, str) or not value:
        raise _expected(path, "a non-empty string", value)
    return value


BOOLEAN = Check(_boolean_fn, "true or false")
STRING = Check(_string_fn, "a non-empty string")
POSITIVE_INT = integer(lambda v: v >= 1, "an integer >= 1")
POSITIVE = number(lambda v: v > 0, "a number > 0")
FRACTION = number(lambda v: 0 <= v < 1, "a number in [0, 1)")


def _pick(path: str, value: Any, options: Iterable[str], noun: str) -> str:
    options = list(options)
    if isinstance(value, str) and value in options:
        return value
    raise ConfigError(f"{path}: unknown {noun} {value!r}{_suggest(value, options)} "
                      f"(expected one of {', '.join(options)})")


def choice(options: Iterable[str], noun: str) -> Check:
    options = tuple(options)
    return Check(lambda path, value: _pick(path, value, options, noun),
                 f"one of {', '.join(options)}")


def optional(check: Check) -> Check:
    return Check(lambda path, value: None if value is None else check.fn(path, value),
                 f"null or {check.what}")


def _sizes_fn(path, value):
    if _is_int(value) and value >= 1:
        return value
    if isinstance(value, list) and value and all(_is_int(v) and v >= 1 for v in value):
        return list(value)
    raise _expected(path, "an integer >= 1 or a list of them (one per spatial axis)", value)


SIZES = Check(_sizes_fn, "an integer >= 1 or a list of them (one per spatial axis)")


def _padding_fn(path, value):
    if isinstance(value, str) and value.upper() in ("VALID", "SAME"):
        return value.upper()
    if _is_int(value) and value >= 0:
        return value
    if (isinstance(value, list) and value
            and all(isinstance(p, list) and len(p) == 2 and all(_is_int(v) and v >= 0 for v in p)
                    for p in value)):
        return [list(p) for p in value]
    raise _expected(path, PADDING.what, value)


PADDING = Check(_padding_fn, "VALID, SAME, an integer >= 0 or a list of [low, high] "
                             "pairs (one per spatial axis)")


def check_mapping(path: str, value: Any, schema: dict, context: str = "",
                  elsewhere: Callable[[str], str] = lambda key: "") -> dict:
    """Checks a mapping against `schema` (key -> `Key`) and fills in defaults.

    Args:
      path: dotted path of the mapping, for messages ("" for the whole config).
      value: the mapping read from YAML.
      schema: its allowed keys.
      context: added to the unknown-key message (e.g. "for optimizer 'sgd'").
      elsewhere: key -> hint naming where else an unknown key would be allowed.

    Returns:
      A new dict with every key of `schema`, in schema order.
    """
    if not isinstance(value, dict):
        raise _expected(path or "config", "a mapping of keys to values", value)
    for key in value:
        if key not in schema:
            raise ConfigError(f"{_join(path, key)}: unknown key{context}{_suggest(key, schema)}"
                              f"{elsewhere(key)} (allowed: {', '.join(schema) or 'none'})")
    out = {}
    for key, spec in schema.items():
        where = _join(path, key)
        if key in value:
            out[key] = spec.check.fn(where, value[key])
        elif spec.default is REQUIRED:
            raise ConfigError(f"{where}: missing; expected {spec.check.what}")
        else:  # defaults go through the check too, so nested sections get their defaults
            out[key] = spec.check.fn(where, copy.deepcopy(spec.default))
    return out


def mapping(schema: dict) -> Check:
    return Check(lambda path, value: check_mapping(path, value, schema), "a mapping")


def tagged(tag: str, variants: dict, noun: str, common: dict | None = None,
           shorthand: bool = False) -> Check:
    """A mapping whose keys depend on its `tag` value (a layer's type, an optimizer's name).

    With `shorthand`, a bare string stands for `{tag: string}`.
    """
    common = common or {}

    def fn(path, value):
        if shorthand and isinstance(value, str):
            value = {tag: value}
        if not isinstance(value, dict):
            raise _expected(path, f"a mapping with a {tag!r} key", value)
        if tag not in value:
            raise ConfigError(f"{_join(path, tag)}: missing; expected one of {', '.join(variants)}")
        name = _pick(_join(path, tag), value[tag], variants, noun)
        schema = {tag: Key(Check(lambda p, v: v, name), REQUIRED), **common, **variants[name]}

        def elsewhere(key):
            owners = [n for n, keys in variants.items() if key in keys]
            return f"; {key!r} belongs to {noun} {', '.join(owners)}" if owners else ""

        return check_mapping(path, value, schema, f" for {noun} {name!r}", elsewhere)

    return Check(fn, f"a mapping with a {tag!r} key ({noun}: {', '.join(variants)})")


def list_of(check: Check) -> Check:
    def fn(path, value):
        if not isinstance(value, list) or not value:
            raise _expected(path, "a non-empty list", value)
        return [check.fn(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return Check(fn, f"a non-empty list of {check.what}")


# ---------------------------------------------------------------- schema

BIAS_INITIALIZERS = {
    "zeros": {},
    "ones": {},
    "constant": {"value": Key(number(lambda v: True, "a number"), 0.0)},
    "normal": {"stddev": Key(POSITIVE, 0.01)},
    "uniform": {"scale": Key(POSITIVE, 0.01)},
    "truncated_normal": {"stddev": Key(POSITIVE, 0.01)},
}
# Variance-scaling initialisers need a fan-in and fan-out, which a bias vector lacks.
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

_KERNEL_INIT = tagged("name", KERNEL_INITIALIZERS, "initialiser", shorthand=True)
_BIAS_INIT = tagged("name", BIAS_INITIALIZERS, "bias initialiser", shorthand=True)

_WEIGHTS = {
    "use_bias": Key(BOOLEAN, True),
    "kernel_init": Key(_KERNEL_INIT, {"name": "lecun_normal"}),
    "bias_init": Key(_BIAS_INIT, {"name": "zeros"}),
}
_POOL = {
    "window": Key(SIZES, REQUIRED),
    "stride": Key(optional(SIZES), None),
    "padding": Key(PADDING, "VALID"),
}

LAYERS = {
    "conv": {
        "features": Key(POSITIVE_INT, REQUIRED),
        "kernel": Key(SIZES, REQUIRED),
        "stride": Key(SIZES, 1),
        "padding": Key(PADDING, "VALID"),
        "dilation": Key(SIZES, 1),
        "groups": Key(POSITIVE_INT, 1),
        **_WEIGHTS,
    },
    "dense": {"features": Key(POSITIVE_INT, REQUIRED), **_WEIGHTS},
    "max_pool": _POOL,
    "avg_pool": _POOL,
    "channel_max": {"group_size": Key(POSITIVE_INT, REQUIRED)},
    "flatten": {},
    "sigmoid": {},
    "tanh": {},
    "relu": {},
    "leaky_relu": {"negative_slope": Key(number(lambda v: True, "a number"), 0.01)},
    "softmax": {},
}

LOSSES = ("softmax_cross_entropy", "quadratic")

_ALPHA = Key(number(lambda v: 0 <= v <= 1, "a number in [0, 1]"), 0.0)

SCHEDULES = {
    "constant": {},
    "cosine": {"alpha": _ALPHA},
    "exponential": {"decay_rate": Key(POSITIVE, 0.9), "staircase": Key(BOOLEAN, False)},
    "warmup_cosine": {
        "warmup_epochs": Key(number(lambda v: v >= 0, "a number >= 0"), 1.0),
        "alpha": _ALPHA,
    },
    "piecewise": {
        "boundaries": Key(list_of(number(lambda v: v > 0, "a number of epochs > 0")), REQUIRED),
        "scales": Key(list_of(POSITIVE), REQUIRED),
    },
}

_MOMENTUM = {"momentum": Key(FRACTION, 0.9)}
_ADAM = {
    "b1": Key(FRACTION, 0.9),
    "b2": Key(FRACTION, 0.999),
    "eps": Key(POSITIVE, 1e-8),
}
OPTIMIZERS = {
    "sgd": {},
    "momentum": _MOMENTUM,
    "nesterov": _MOMENTUM,
    "adam": _ADAM,
    "adamw": {**_ADAM, "weight_decay": Key(number(lambda v: v >= 0, "a number >= 0"), 1e-4)},
}

_OPTIMIZER = tagged("name", OPTIMIZERS, "optimizer", common={
    "learning_rate": Key(POSITIVE, REQUIRED),
    "schedule": Key(tagged("name", SCHEDULES, "schedule", shorthand=True), {"name": "constant"}),
})

_MODEL = {
    "input_shape": Key(optional(list_of(POSITIVE_INT)), None),
    "layers": Key(list_of(tagged("type", LAYERS, "layer type")), REQUIRED),
}

_DATA = {
    "name": Key(choice(DATASETS, "data set"), REQUIRED),
    "batch_size": Key(POSITIVE_INT, 128),
    "normalize": Key(choice(("standardize", "scale", "none"), "normalisation"), "standardize"),
    "dir": Key(optional(STRING), None),
    "data_dir": Key(optional(STRING), None),
    "limit_train": Key(optional(POSITIVE_INT), None),
    "limit_test": Key(optional(POSITIVE_INT), None),
}

_TRAIN = {
    "epochs": Key(POSITIVE_INT, 10),
    "seed": Key(integer(lambda v: v >= 0, "an integer >= 0"), 0),
    "precision": Key(choice(("float32", "float64"), "precision"), "float32"),
    "eval_every": Key(POSITIVE_INT, 1),
    "checkpoint_every": Key(integer(lambda v: v >= 0, "an integer >= 0"), 1),
}

SCHEMA = {
    "model": Key(mapping(_MODEL), REQUIRED),
    "loss": Key(choice(LOSSES, "loss"), REQUIRED),
    "optimizer": Key(_OPTIMIZER, REQUIRED),
    "data": Key(mapping(_DATA), REQUIRED),
    "train": Key(mapping(_TRAIN), {}),
}


# ---------------------------------------------------------------- validation

def validate_model(model_cfg: Any, loss: str) -> dict:
    """Checks the `model` section, defaults filled, and that its last layer suits `loss`."""
    model = check_mapping("model", model_cfg, _MODEL)
    last = len(model["layers"]) - 1
    if loss == "softmax_cross_entropy" and model["layers"][last]["type"] == "softmax":
        raise ConfigError(f"model.layers[{last}] (softmax): loss softmax_cross_entropy takes "
                          f"logits and applies softmax itself; remove this layer or use "
                          f"loss: quadratic")
    return model


def validate_optimizer(opt_cfg: Any, epochs: int) -> dict:
    """Checks the `optimizer` section, defaults filled, and that its schedule fits `epochs`."""
    opt = _OPTIMIZER.fn("optimizer", opt_cfg)
    schedule = opt["schedule"]
    if schedule["name"] == "warmup_cosine" and schedule["warmup_epochs"] >= epochs:
        raise ConfigError(f"optimizer.schedule.warmup_epochs: must be less than train.epochs "
                          f"({epochs}), got {schedule['warmup_epochs']:g}")
    if schedule["name"] == "piecewise":
        bounds, scales = schedule["boundaries"], schedule["scales"]
        if len(bounds) != len(scales):
            raise ConfigError(f"optimizer.schedule.scales: expected one scale per boundary "
                              f"({len(bounds)}), got {len(scales)}")
        if any(b >= a for b, a in zip(bounds, bounds[1:])):
            raise ConfigError(f"optimizer.schedule.boundaries: expected increasing epochs, "
                              f"got {bounds}")
    return opt


def validate_config(raw: Any) -> dict:
    """Checks a whole config (as read from YAML) and returns it with every default filled.

    Idempotent: a validated config validates to itself.

    Raises:
      ConfigError: naming the first bad key.
    """
    cfg = check_mapping("", raw, SCHEMA)
    cfg["model"] = validate_model(cfg["model"], cfg["loss"])
    cfg["optimizer"] = validate_optimizer(cfg["optimizer"], cfg["train"]["epochs"])
    return cfg


# ---------------------------------------------------------------- files and overrides

def read_yaml(path: str | os.PathLike) -> Any:
    """The parsed contents of a YAML file, with file and syntax problems as ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {os.fspath(path)}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {os.fspath(path)}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{os.fspath(path)}: invalid YAML: {_yaml_problem(err)}") from None


def _split_key(key: str) -> list:
    """'model.layers[0].features' or 'model.layers.0.features' -> [model, layers, 0, features]
    (all strings; list indices are resolved against the config)."""
    parts = re.sub(r"\[(-?\d+)\]", r".\1", key).split(".")
    if not all(parts):
        raise ConfigError(f"--set: bad key {key!r} (expected dotted names like "
                          f"optimizer.learning_rate or model.layers.0.features)")
    return parts


def _child(node: Any, part: str, parent: str, create: bool) -> tuple:
    """(container, key) addressing `part` in `node` (found at path `parent`); lists take
    integer indices."""
    where = _join(parent, part)
    if isinstance(node, dict):
        if part not in node and create:
            node[part] = {}
        return node, part
    if isinstance(node, list):
        if not re.fullmatch(r"\d+", part) or int(part) >= len(node):
            raise ConfigError(f"{where}: no item {part!r} in a list of {len(node)} items")
        return node, int(part)
    raise ConfigError(f"{where}: cannot set it, {parent} holds a {type(node).__name__}, "
                      f"not a mapping or a list")


def apply_override(cfg: dict, override: str) -> dict:
    """Applies one `KEY=VALUE` override to `cfg` in place and returns `cfg`.

    KEY is dotted (`optimizer.learning_rate`, `model.layers.0.features`, or
    `model.layers[0].features`); missing mappings on the way are created.
    VALUE is parsed as YAML (`1`, `0.05`, `1e-3`, `true`, `SAME`, `[5, 5]`,
    `{name: cosine}`). Validate afterwards (`validate_config`).
    """
    key, sep, text = override.partition("=")
    if not sep:
        raise ConfigError(f"--set: expected KEY=VALUE, got {override!r}")
    parts = _split_key(key.strip())
    node, path = cfg, ""
    for part in parts[:-1]:
        container, index = _child(node, part, path, create=True)
        node, path = container[index], _join(path, part)
    container, index = _child(node, parts[-1], path, create=False)
    container[index] = parse_value(text.strip())
    return cfg


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict:
    """Reads a YAML config, applies `--set` overrides in order, validates and fills defaults."""
    raw = read_yaml(path)
    for override in overrides:
        if not isinstance(raw, dict):
            break
        apply_override(raw, override)
    return validate_config(raw)


def dump_config(cfg: dict) -> str:
    """The config as YAML that `load_config` reads back to the same dict."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
