"""Experiment configs: YAML files, their schema, validation and `--set` overrides.

A config has five sections and an optional list of imports. Keys marked REQUIRED
have no default; every other key may be left out and gets the default in brackets.
Unknown keys are errors.

    imports: [[]] Python modules to import before the rest is read, so that the
      layers they register (`jaxbp.register_layer`) can be named as a `type`.
      They are looked up beside the config file first, then as usual.

    model:
      input_shape: [null] shape of one example as the model sees it; null means
        the data set's. Otherwise it must hold as many values as the data set's
        examples, which are reshaped to it (e.g. [40, 1] for a 1-D conv).
      layers: REQUIRED, a non-empty list; each item has a `type`, a layer
        registered in `jaxbp.registry`, and that layer's hyperparameters as keys
        (read from its registration). The built-in ones (`jaxbp.builtins`):
        conv: features REQUIRED, kernel REQUIRED (int, or one int per spatial
          axis), stride [1], padding [VALID], dilation [1], groups [1],
          use_bias [true], kernel_init [lecun_normal], bias_init [zeros]
        conv_transpose: features REQUIRED (its output channels), kernel
          REQUIRED, stride [1], padding [VALID], dilation [1], groups [1],
          output_padding [0] (int or list, each below the stride or the
          dilation), use_bias [true], kernel_init [lecun_normal], bias_init
          [zeros]; stride, padding and dilation are the conv's it is the
          adjoint of, and SAME makes the output the input's size times stride
        dense: features REQUIRED, use_bias [true], kernel_init [lecun_normal],
          bias_init [zeros]
        max_pool, avg_pool: window REQUIRED (int or list), stride [null: the
          window], padding [VALID]
        channel_max: group_size REQUIRED (max over runs of that many channels)
        leaky_relu: negative_slope [0.01]
        upsample: factor REQUIRED (int or list); layer_norm: eps [1e-5]
        batch_norm: momentum [0.9] (the running statistics keep that much of
          their old value each step), eps [1e-5]
        dropout: rate REQUIRED, in [0, 1)
        flatten, global_avg_pool, sigmoid, tanh, relu, softmax: no keys
        residual: layers REQUIRED (a list of layers: the main path), shortcut
          [[]: the identity] (a list of layers); the block outputs
          main(x) + shortcut(x), so both paths must give the same shape
      padding is VALID, SAME (any case), an int p (p zeros both sides of every
      spatial axis, as PyTorch's padding=p) or one [low, high] pair per axis.
      An initialiser (`jax.nn.initializers`) is a name or {name: ..., its keys}:
      zeros, ones, constant {value [0.0]}, normal {stddev [0.01]},
      uniform {scale [0.01]} (on [0, scale)), truncated_normal {stddev [0.01]},
      and, for kernels only, lecun_normal, lecun_uniform, glorot_normal,
      glorot_uniform, he_normal, he_uniform, variance_scaling {scale [1.0],
      mode [fan_in] | fan_out | fan_avg, distribution [truncated_normal] |
      normal | uniform} (PyTorch's default is scale 1/3, uniform).
    loss: REQUIRED, a registered loss: softmax_cross_entropy (on logits, so the
      net must not end in a softmax layer) or quadratic (1/2 |out - one_hot|^2).
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
      name: REQUIRED, a name in `jaxbp.app.data.DATASETS`
      batch_size [128]; normalize [standardize] | scale | none;
      dir [null]: folder of the source files (idx files for the images);
      data_dir [null]: where prepared data is cached;
      limit_train [null], limit_test [null]: use only the first N examples
      augment [{}]: training batches only, drawn from (train.seed, epoch) so a
        resumed run sees the same ones: crop_padding [0] (pad every spatial axis
        by that many background values, then crop a random window of the
        original size), flip [false] (mirror the last spatial axis, half the time)
      target [labels] | input: what the loss compares the outputs with; input
        trains an autoencoder (the net must output the input's shape, and the
        loss compare arrays, e.g. quadratic); it reports reconstruction error
    train:
      epochs [10], seed [0], precision [float32] | float64,
      eval_every [1] (epochs between test evaluations),
      checkpoint_every [1] (epochs between checkpoints; 0: none),
      devices [null]: how many local devices train and evaluate, data parallel
        (null: all of them; N: the first N; 1: one). data.batch_size is the
        global batch, split evenly over them (it must be a multiple of N); the
        batches and the numbers are those of one device

`load_config` checks all of this once and returns a read-only, typed `Config` (its
sections read by attribute: `cfg.data.batch_size`, `cfg.model.layers[0].type`). Shape checks that need the data set's shape
(kernels that do not fit, the last layer's size) happen in
`jaxbp.app.model.build_model`, which raises the same `ConfigError`.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from types import MappingProxyType
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import yaml

from jaxbp import registry
from jaxbp.app.data import DATASETS
from jaxbp.app.model import RESIDUAL
from jaxbp.schema import (BOOLEAN, FRACTION, POSITIVE, POSITIVE_INT, REQUIRED, STRING, Check,
                          ConfigError, Key, join_path, check_mapping, choice, integer, list_of,
                          mapping, number, optional, tagged)

__all__ = ["ConfigError", "Section", "Config", "ModelConfig", "LayerConfig", "OptimizerConfig",
           "ScheduleConfig", "DataConfig", "AugmentConfig", "TrainConfig", "DATA", "TRAIN", "schema", "validate_config",
           "validate_model", "validate_optimizer", "load_config",
           "apply_override", "dump_config", "read_yaml", "parse_value", "import_modules"]


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


# ---------------------------------------------------------------- schema

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

DATA = {
    "name": Key(choice(DATASETS, "data set"), REQUIRED),
    "batch_size": Key(POSITIVE_INT, 128),
    "normalize": Key(choice(("standardize", "scale", "none"), "normalisation"), "standardize"),
    "dir": Key(optional(STRING), None),
    "data_dir": Key(optional(STRING), None),
    "limit_train": Key(optional(POSITIVE_INT), None),
    "limit_test": Key(optional(POSITIVE_INT), None),
    "augment": Key(mapping({
        "crop_padding": Key(integer(lambda v: v >= 0, "an integer >= 0"), 0),
        "flip": Key(BOOLEAN, False),
    }), {}),
    "target": Key(choice(("labels", "input"), "target"), "labels"),
}

TRAIN = {
    "epochs": Key(POSITIVE_INT, 10),
    "seed": Key(integer(lambda v: v >= 0, "an integer >= 0"), 0),
    "precision": Key(choice(("float32", "float64"), "precision"), "float32"),
    "eval_every": Key(POSITIVE_INT, 1),
    "checkpoint_every": Key(integer(lambda v: v >= 0, "an integer >= 0"), 1),
    "devices": Key(optional(POSITIVE_INT), None),
}


def _module_names_fn(path: str, value: Any) -> list:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path}: expected a list of module names, got {value!r} "
                          f"({type(value).__name__})")
    return list(value)


_IMPORTS = Key(Check(_module_names_fn, "a list of module names"), [])


def schema() -> dict:
    """The whole config's schema, its layer types and losses those registered now."""
    return {
        "imports": _IMPORTS,
        "model": Key(mapping(_model_schema()), REQUIRED),
        "loss": Key(choice(registry.loss_names(), "loss"), REQUIRED),
        "optimizer": Key(_OPTIMIZER, REQUIRED),
        "data": Key(mapping(DATA), REQUIRED),
        "train": Key(mapping(TRAIN), {}),
    }


def _model_schema() -> dict:
    return {
        "input_shape": Key(optional(list_of(POSITIVE_INT)), None),
        "layers": Key(list_of(tagged("type", _layer_types(), "layer type")), REQUIRED),
    }


def _layer_types() -> dict:
    """type -> its keys' schema: every layer registered now, and the residual block, whose
    `layers` and `shortcut` are lists of layers again."""
    types = {name: dict(registry.get(name).hyperparameters) for name in registry.layer_names()}
    layer = Check(lambda path, value: tagged("type", types, "layer type").fn(path, value),
                  "a layer")
    types[RESIDUAL] = {"layers": Key(list_of(layer), REQUIRED),
                       "shortcut": Key(_possibly_empty(list_of(layer)), [])}
    return types


def _possibly_empty(check: Check) -> Check:
    """`check`, or an empty list (a residual block's identity shortcut); null is [] too."""
    return Check(lambda path, value: [] if value in (None, []) else check.fn(path, value),
                 f"[] or {check.what}")


# ---------------------------------------------------------------- the validated config

class Section(Mapping):
    """A validated config section, read-only: values by attribute (`cfg.data.batch_size`),
    nested mappings as Sections and lists as tuples. It is also a read-only Mapping, for
    code that takes plain mappings (`jaxbp.app.data`)."""

    __slots__ = ("_values",)
    # key -> the Section subclass its mapping (or each item of its list) becomes
    _nested: ClassVar[dict] = {}

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", MappingProxyType(
            {key: _frozen(value, self._nested.get(key, Section))
             for key, value in values.items()}))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"config section has no key {key!r} "
                                 f"(keys: {', '.join(self._values)})") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("a validated config is read-only; change the YAML or --set")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()!r})"

    def __eq__(self, other: Any) -> bool:
        """Equal to a Section or a plain mapping of the same values (lists for tuples)."""
        if isinstance(other, Section):
            other = other.to_dict()
        return isinstance(other, Mapping) and self.to_dict() == dict(other)

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __reduce__(self):
        return type(self), (self.to_dict(),)

    def __copy__(self) -> "Section":
        return self

    def __deepcopy__(self, memo) -> "Section":
        return self  # read-only: a copy could never differ

    def to_dict(self) -> dict:
        """Plain dicts and lists, as YAML and JSON write them."""
        return {key: _thawed(value) for key, value in self._values.items()}


def _frozen(value: Any, section: type) -> Any:
    if isinstance(value, Mapping) and not isinstance(value, Section):
        return section(value)
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v, section) for v in value)
    return value


class LayerConfig(Section):
    """One item of `model.layers`: its `type` and that layer's hyperparameters; a residual
    block's `layers` and `shortcut` are LayerConfigs again."""
    type: str

    @property
    def hyperparameters(self) -> dict:
        """Every key but `type`, as plain values (lists, dicts)."""
        return {k: _thawed(v) for k, v in self.items() if k != "type"}


LayerConfig._nested = {"layers": LayerConfig, "shortcut": LayerConfig}


class ModelConfig(Section):
    input_shape: Optional[Tuple[int, ...]]
    layers: Tuple[LayerConfig, ...]
    _nested = {"layers": LayerConfig}


class ScheduleConfig(Section):
    """`name` and that schedule's keys (`alpha`, `decay_rate`, ...)."""
    name: str


class OptimizerConfig(Section):
    """`name`, `learning_rate`, `schedule` and that optimizer's keys (`momentum`, `b1`, ...)."""
    name: str
    learning_rate: float
    schedule: ScheduleConfig
    _nested = {"schedule": ScheduleConfig}


class AugmentConfig(Section):
    crop_padding: int
    flip: bool


class DataConfig(Section):
    name: str
    batch_size: int
    normalize: str
    dir: Optional[str]
    data_dir: Optional[str]
    limit_train: Optional[int]
    limit_test: Optional[int]
    augment: AugmentConfig
    target: str
    _nested = {"augment": AugmentConfig}


class TrainConfig(Section):
    epochs: int
    seed: int
    precision: str
    eval_every: int
    checkpoint_every: int
    devices: Optional[int]


class Config(Section):
    """A whole validated config (`load_config`): its sections by attribute."""
    imports: Tuple[str, ...]
    model: ModelConfig
    loss: str
    optimizer: OptimizerConfig
    data: DataConfig
    train: TrainConfig
    _nested = {"model": ModelConfig, "optimizer": OptimizerConfig, "data": DataConfig,
               "train": TrainConfig}


def _thawed(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


# ---------------------------------------------------------------- validation

def _check_last_layer(model: dict, loss: str) -> None:
    last = len(model["layers"]) - 1
    last_type = model["layers"][last]["type"]
    why = registry.get(loss, "loss").forbid_last_layer.get(last_type)
    if why:
        raise ConfigError(f"model.layers[{last}] ({last_type}): {why}")


def _check_schedule(schedule: dict, epochs: int) -> None:
    """The schedule fits `epochs`: warm-up shorter than the run, piecewise boundaries sound."""
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


def validate_model(raw: Any, loss: str) -> ModelConfig:
    """One `model` section checked on its own (as `validate_config` checks it), for building
    a model without a whole config."""
    model = check_mapping("model", raw, _model_schema())
    _check_last_layer(model, loss)
    return ModelConfig(model)


def validate_optimizer(raw: Any, epochs: int) -> OptimizerConfig:
    """One `optimizer` section checked on its own (as `validate_config` checks it), for
    building an optimizer without a whole config."""
    opt = _OPTIMIZER.fn("optimizer", raw)
    _check_schedule(opt["schedule"], epochs)
    return OptimizerConfig(opt)


def import_modules(names: Sequence[str], search: Sequence[str] = ()) -> None:
    """Imports each module of a config's `imports`, `search` folders tried first.

    Raises:
      ConfigError: a module that cannot be found, or whose import fails (a layer
        registered twice, an error in it), as one line naming it.
    """
    added = [folder for folder in search if folder not in sys.path]
    sys.path[:0] = added
    try:
        for index, name in enumerate(names):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:
                where = ", ".join(search) or "the Python path"
                raise ConfigError(f"imports[{index}]: cannot import module {name!r}: {err} "
                                  f"(looked beside the config, in {where}, and on the Python "
                                  f"path)") from None
            except Exception as err:  # the module's own error, whatever it is: one line
                raise ConfigError(f"imports[{index}]: importing module {name!r} failed: "
                                  f"{type(err).__name__}: {err}") from None
    finally:
        for folder in added:
            sys.path.remove(folder)


def validate_config(raw: Any, search: Sequence[str] = ()) -> Config:
    """Checks a whole config (as read from YAML), once, into a read-only `Section`.

    The modules of `imports` are imported first (from `search` first), so that the layers
    they register are known to the schema. Idempotent: `validate_config(cfg.to_dict())`
    gives `cfg` again.

    Raises:
      ConfigError: naming the first bad key.
    """
    if isinstance(raw, Section):
        raw = raw.to_dict()
    if isinstance(raw, Mapping) and "imports" in raw:
        import_modules(_IMPORTS.check.fn("imports", raw["imports"]), search)
    cfg = check_mapping("", raw, schema())
    _check_last_layer(cfg["model"], cfg["loss"])
    _check_schedule(cfg["optimizer"]["schedule"], cfg["train"]["epochs"])
    return Config(cfg)


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
    where = join_path(parent, part)
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
        node, path = container[index], join_path(path, part)
    container, index = _child(node, parts[-1], path, create=False)
    container[index] = parse_value(text.strip())
    return cfg


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """Reads a YAML config, applies `--set` overrides in order, validates and fills defaults."""
    raw = read_yaml(path)
    for override in overrides:
        if not isinstance(raw, dict):
            break
        apply_override(raw, override)
    return validate_config(raw, [os.path.dirname(os.path.abspath(path))])


def dump_config(cfg: Mapping) -> str:
    """The config as YAML that `load_config` reads back to the same config."""
    plain = cfg.to_dict() if isinstance(cfg, Section) else cfg
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=None)
