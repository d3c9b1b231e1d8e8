"""Checks of hyperparameter and config values: each value is checked and normalised once.

A `Check` validates one value and says what it wants; a `Key` is a checked key with its default
(`REQUIRED` for none). Mappings of keys (`check_mapping`, `tagged` for a mapping whose keys
depend on a tag such as a layer's `type`) fill in defaults and reject unknown keys with a
suggestion. Every problem is one `ConfigError` line naming the dotted path of the value.

The layer registry (`jaxbp.registry`) describes hyperparameters with these checks, and the
experiment config (`jaxbp.app.config`) its sections; nothing here reads files.
"""
from __future__ import annotations

import copy
import difflib
from typing import Any, Callable, Iterable, NamedTuple


class ConfigError(ValueError):
    """A value that does not fit its schema, as one line naming its key (e.g.
    `optimizer.learning_rate`, `model.layers[2].features`, `conv.features`)."""

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


# ---------------------------------------------------------------- checks

def join_path(path: str, key: Any) -> str:
    """`path.key`, or `key` alone at the top."""
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


def spatial_ints(minimum: int) -> Check:
    """An integer >= `minimum` or a non-empty list of them (one per spatial axis)."""
    what = f"an integer >= {minimum} or a list of them (one per spatial axis)"

    def fn(path, value):
        if _is_int(value) and value >= minimum:
            return value
        if (isinstance(value, (list, tuple)) and value
                and all(_is_int(v) and v >= minimum for v in value)):
            return list(value)
        raise _expected(path, what, value)
    return Check(fn, what)


SIZES = spatial_ints(1)


def _padding_fn(path, value):
    if isinstance(value, str) and value.upper() in ("VALID", "SAME"):
        return value.upper()
    if _is_int(value) and value >= 0:
        return value
    if (isinstance(value, (list, tuple)) and value
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(v) and v >= 0 for v in p)
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
            raise ConfigError(f"{join_path(path, key)}: unknown key{context}{_suggest(key, schema)}"
                              f"{elsewhere(key)} (allowed: {', '.join(schema) or 'none'})")
    out = {}
    for key, spec in schema.items():
        where = join_path(path, key)
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
            raise ConfigError(f"{join_path(path, tag)}: missing; expected one of {', '.join(variants)}")
        name = _pick(join_path(path, tag), value[tag], variants, noun)
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
