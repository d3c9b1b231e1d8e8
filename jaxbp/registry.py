"""One registry of primitives: what a layer or a loss is, written down once.

A registered layer is a hand rule, its plain twin, how to draw its parameters and what its
hyperparameters are. Everything else reads it from here: `jaxbp.nn.layer` builds a stax-style
layer, an experiment config names it as a `type:`, `jaxbp check` runs it through both twins,
and the benchmark counts its FLOPs and builds its PyTorch twin. The built-in layers are
registered in `jaxbp.builtins` exactly as a user registers one:

    jaxbp.register_layer(
        "my_softplus",            # the config's `type`
        hand=softplus,            # f(x, *params, **hyperparameters) -> y, carrying a custom_vjp
        reference=plain_softplus, # same signature, plain JAX
        params=None,              # or {"w": init(rng, input_shape, dtype, **hyperparameters), ...}
    )

The hyperparameters are read from the signatures: every parameter of `hand` after `x` and the
parameter arrays, and every keyword of the initialisers after `(rng, input_shape, dtype)`. A
default in a signature is the hyperparameter's default; no default makes it required. Each
function is given only the hyperparameters its own signature names. `checks` may add a
`jaxbp.schema.Check` per hyperparameter, which validates and normalises its value.

Two kinds of layer behave differently in training and in evaluation, and say so here:

  * A layer whose `hand` takes a parameter named `key` is random (dropout): in training the
    network hands it a fresh PRNG key; `key` is not a hyperparameter.
  * A layer with `state` keeps non-trainable arrays (batch norm's running statistics): each
    is drawn like a parameter, and in training `update(x, *state, **hyperparameters)` returns
    their new values from the layer's input. The optimizer never sees them.

Either may name an `inference(x, *params, *state, **hyperparameters)` that evaluation runs
instead of `hand` (running statistics instead of the batch's; no dropout). Evaluation is not
differentiated, so it has no rule of its own.
"""
from __future__ import annotations

import dataclasses
import inspect
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Optional, Tuple

import jax

from jaxbp.schema import REQUIRED, Check, ConfigError, Key, check_mapping

__all__ = ["Primitive", "Ops", "HAND", "REFERENCE", "RegistryError", "register_layer",
           "register_loss", "unregister", "get", "layer_names", "loss_names"]


class RegistryError(ValueError):
    """A registration that cannot be accepted (a name taken, signatures that disagree)."""


_ANY = Check(lambda path, value: value, "any value")


def _varying_axes(array) -> frozenset:
    """The `jax.shard_map` mesh axes over which `array` differs between devices (its type's
    varying manual axes: `vma` up to jax 0.7, `manual_axis_type.varying` since); empty
    outside shard_map."""
    aval = jax.typeof(array)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(aval, "vma", None) or getattr(manual, "varying", ()))


def varying_like(x, array):
    """`array` (a parameter; None passes) marked as varying as `x` inside `jax.shard_map`.

    A hand rule's backward sums a parameter's delta over the local batch only, so the delta
    varies like `x`; `jax.custom_vjp` requires it to have its primal's type. Marked varying
    (`lax.pcast(..., to="varying")`) before the rule, the parameter's gradient is summed over
    the devices where the mark is transposed, once, as JAX sums the gradient of any replicated
    input (a psum of one's own on top would count it N times). Outside shard_map, unchanged.
    """
    if array is None:
        return None
    missing = tuple(sorted(_varying_axes(x) - _varying_axes(array)))
    return jax.lax.pcast(array, missing, to="varying") if missing else array


@dataclasses.dataclass(frozen=True, eq=False)
class Primitive:
    """A registered layer or loss.

    Attributes:
      name: the config's `type` (layers) or `loss` (losses).
      kind: "layer" or "loss".
      hand: the rule carrying a custom_vjp, `hand(x, *params, **hyperparameters)`.
      reference: its plain twin with the same signature.
      params: `(name, init)` pairs in the order `hand` takes them after `x`;
        `init(rng, input_shape, dtype, **hyperparameters)` returns the array, or None for a
        parameter switched off (a bias with `use_bias=False`), passed to `hand` as None.
      hyperparameters: name -> `jaxbp.schema.Key` (its check and default), in signature order.
      flops: optional `macs(input_shape, output_shape, param_shapes) -> int`, the multiply-adds
        of one example's forward (the benchmark's FLOP model); None counts nothing.
      torch: optional `build(torch, input_shape, **hyperparameters) -> torch.nn.Module`, the
        PyTorch twin for the benchmark (input_shape channels-last, without the batch).
      state: `(name, init)` pairs of non-trainable arrays, drawn like `params`.
      update: `update(x, *state, **hyperparameters) -> new state arrays` (a tuple in `state`'s
        order), the state after a training step on input x; required with `state`.
      inference: `inference(x, *params, *state, **hyperparameters) -> y` run in evaluation
        instead of `hand`; None runs `hand` (or the twin) there too.
      random: whether `hand` takes a PRNG `key` (a fresh one per training step and layer).
      targets: for losses, "labels" (integer classes) or "one_hot".
      forbid_last_layer: for losses, layer type -> why it cannot come right before this loss.
      module: the module that registered it.
    """
    name: str
    kind: str
    hand: Callable
    reference: Callable
    params: Tuple[Tuple[str, Callable], ...]
    hyperparameters: Mapping[str, Key]
    flops: Optional[Callable] = None
    torch: Optional[Callable] = None
    state: Tuple[Tuple[str, Callable], ...] = ()
    update: Optional[Callable] = None
    inference: Optional[Callable] = None
    random: bool = False
    targets: str = "labels"
    forbid_last_layer: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))
    module: str = ""

    def check(self, values: Mapping[str, Any], path: Optional[str] = None) -> dict:
        """The hyperparameters checked, defaults filled; one ConfigError line for an unknown,
        missing or bad one (named `path.key`, `path` defaulting to the primitive's name)."""
        return check_mapping(self.name if path is None else path, dict(values),
                             dict(self.hyperparameters), f" for {self.kind} {self.name!r}")

    def call(self, function: Callable, x, params: Mapping[str, Any],
             hyperparameters: Mapping[str, Any], key=None):
        """`function(x, *params, **its hyperparameters)`: `function` is `hand`, `reference`
        or a replacement of them with the same signature; a random layer gets `key` too."""
        arrays = [varying_like(x, params.get(name)) for name, _ in self.params]
        extra = {"key": key} if self.random else {}
        return function(x, *arrays, **_taken_by(function, hyperparameters, self.hand), **extra)

    def infer(self, x, params: Mapping[str, Any], state: Mapping[str, Any],
              hyperparameters: Mapping[str, Any]):
        """Evaluation's forward: `inference(x, *params, *state, ...)`."""
        arrays = [params.get(name) for name, _ in self.params]
        arrays += [state[name] for name, _ in self.state]
        return self.inference(x, *arrays, **_taken_by(self.inference, hyperparameters))

    def updated(self, x, state: Mapping[str, Any], hyperparameters: Mapping[str, Any]) -> dict:
        """The state after a training step on input x: `update(x, *state, ...)` by name."""
        new = self.update(x, *(state[name] for name, _ in self.state),
                          **_taken_by(self.update, hyperparameters))
        return dict(zip((name for name, _ in self.state), new))

    def torch_module(self, torch, input_shape, hyperparameters: Mapping[str, Any]):
        """The PyTorch twin (`torch`'s module for one example's channels-last input shape),
        or None when none is registered."""
        if self.torch is None:
            return None
        return self.torch(torch, tuple(input_shape), **_taken_by(self.torch, hyperparameters))

    def init(self, rng, input_shape, dtype, hyperparameters: Mapping[str, Any]) -> dict:
        """The parameters drawn for one input shape: `{name: array}`, switched-off ones left
        out."""
        return _drawn(self.params, rng, input_shape, dtype, hyperparameters)

    def init_state(self, input_shape, dtype, hyperparameters: Mapping[str, Any]) -> dict:
        """The non-trainable state for one input shape: `{name: array}` (`{}` for none)."""
        import jax
        return _drawn(self.state, jax.random.PRNGKey(0), input_shape, dtype, hyperparameters)


def _drawn(inits, rng, input_shape, dtype, hyperparameters: Mapping[str, Any]) -> dict:
    """`{name: init(key, input_shape, dtype, ...)}` over `(name, init)` pairs, one key each,
    None values (a switched-off bias) left out."""
    import jax
    arrays = {}
    keys = jax.random.split(rng, max(len(inits), 1))
    for key, (name, init) in zip(keys, inits):
        value = init(key, tuple(input_shape), dtype, **_taken_by(init, hyperparameters))
        if value is not None:
            arrays[name] = value
    return arrays


def _static(value: Any) -> Any:
    """Lists (from YAML) as tuples: hyperparameters are static, hashable values."""
    return tuple(_static(v) for v in value) if isinstance(value, (list, tuple)) else value


def _taken_by(function: Callable, values: Mapping[str, Any], like: Optional[Callable] = None
              ) -> dict:
    """The hyperparameters `function` names (those of `like` when it takes **kwargs, as a
    replacement wrapping a rule does), as static values."""
    names = _keyword_names(function)
    if names is None:
        names = set(values) if like is None else _keyword_names(like)
    return {k: _static(v) for k, v in values.items() if names is None or k in names}


def _keyword_names(function: Callable) -> Optional[set]:
    """Names `function` accepts by keyword; None when it takes **kwargs or has no signature."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _signature_defaults(function: Callable, skip: int, what: str) -> dict:
    """name -> default (REQUIRED when none) of `function`'s parameters after the first `skip`."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        raise RegistryError(f"{what}: cannot read the signature of {function!r}") from None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < skip and not any(p.kind is p.VAR_POSITIONAL for p in parameters):
        raise RegistryError(f"{what}: {getattr(function, '__name__', function)} must take "
                            f"{skip} positional arguments, its signature is "
                            f"{inspect.signature(function)}")
    named = [p for p in parameters[skip:]
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {p.name: REQUIRED if p.default is p.empty else p.default for p in named}


def _hyperparameters(name: str, hand: Callable, inits: Mapping[str, Callable],
                     checks: Mapping[str, Check], state: Optional[Mapping[str, Callable]] = None,
                     update: Optional[Callable] = None, inference: Optional[Callable] = None
                     ) -> dict:
    """The schema of a primitive's hyperparameters, from its signatures and `checks`."""
    merged: dict = {}
    # The initialisers first: their keys (features, kernel) lead a layer's description.
    sources = [(f"{name}: params[{p!r}]", init, 3) for p, init in inits.items()]
    state = state or {}
    sources += [(f"{name}: state[{s!r}]", init, 3) for s, init in state.items()]
    sources += [(f"{name}: hand", hand, 1 + len(inits))]
    if update is not None:
        sources += [(f"{name}: update", update, 1 + len(state))]
    if inference is not None:
        sources += [(f"{name}: inference", inference, 1 + len(inits) + len(state))]
    for what, function, skip in sources:
        for key, default in _signature_defaults(function, skip, what).items():
            if key == "key":  # a random layer's PRNG key comes from the network
                continue
            if key in merged and merged[key] is not default and merged[key] != default:
                raise RegistryError(f"{what}: hyperparameter {key!r} defaults to {default!r} "
                                    f"here but to {merged[key]!r} in another signature")
            merged[key] = default
    unknown = sorted(set(checks) - set(merged))
    if unknown:
        raise RegistryError(f"{name}: checks name {', '.join(unknown)}, which no signature "
                            f"takes (hyperparameters: {', '.join(merged) or 'none'})")
    return {key: Key(checks.get(key, _ANY), default) for key, default in merged.items()}


_REGISTRY: dict = {}


def _register(primitive: Primitive) -> Primitive:
    known = _REGISTRY.get(primitive.name)
    # The same module registering again (a reload, a notebook cell run twice) replaces its own.
    if known is not None and known.module != primitive.module:
        raise RegistryError(f"{primitive.kind} {primitive.name!r} is already registered by "
                            f"{known.module or 'another module'}; choose another name")
    _REGISTRY[primitive.name] = primitive
    return primitive


def _caller_module() -> str:
    frame = inspect.currentframe()
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


def register_layer(name: str, *, hand: Callable, reference: Callable,
                   params: Optional[Mapping[str, Callable]] = None,
                   checks: Optional[Mapping[str, Check]] = None,
                   flops: Optional[Callable] = None, torch: Optional[Callable] = None,
                   state: Optional[Mapping[str, Callable]] = None,
                   update: Optional[Callable] = None, inference: Optional[Callable] = None
                   ) -> Primitive:
    """Registers a layer under `name`, its config `type`.

    Args:
      name: the layer's name: `nn.layer(name, ...)` and `type: name` in a config.
      hand: `f(x, *params, **hyperparameters) -> y`, carrying a custom_vjp (see
        `jaxbp.testing.check_rule` to prove it against `reference`).
      reference: plain JAX with the same signature; JAX differentiates it.
      params: `{name: init(rng, input_shape, dtype, **hyperparameters)}` in the order `hand`
        takes them after x, `input_shape` being one example's shape; None for no parameters.
      checks: optional `jaxbp.schema.Check` per hyperparameter.
      flops, torch: optional benchmark hooks, see `Primitive`.
      state: `{name: init(rng, input_shape, dtype, **hyperparameters)}`, non-trainable arrays
        that `update` renews in training (running statistics); None for none.
      update: `update(x, *state, **hyperparameters) -> tuple of new state arrays`.
      inference: `inference(x, *params, *state, **hyperparameters) -> y`, run in evaluation
        instead of `hand`.

    Returns:
      The `Primitive`.

    Raises:
      RegistryError: `name` is registered by another module, the signatures disagree, or
        `state` comes without `update`.
    """
    inits, kept = dict(params or {}), dict(state or {})
    if bool(kept) != (update is not None):
        raise RegistryError(f"{name}: state and update go together: state names the arrays, "
                            f"update renews them")
    schema = _hyperparameters(name, hand, inits, dict(checks or {}), kept, update, inference)
    return _register(Primitive(name, "layer", hand, reference, tuple(inits.items()),
                               MappingProxyType(schema), flops, torch, tuple(kept.items()),
                               update, inference, "key" in (_keyword_names(hand) or ()),
                               module=_caller_module()))


def register_loss(name: str, *, hand: Callable, reference: Callable, targets: str = "labels",
                  forbid_last_layer: Optional[Mapping[str, str]] = None) -> Primitive:
    """Registers a loss `f(outputs, targets) -> scalar` (and its twin) as config `loss: name`.

    `targets` says what the loss compares the outputs with: "labels" (integer classes) or
    "one_hot" (the labels one-hot encoded in the outputs' dtype).
    """
    if targets not in ("labels", "one_hot"):
        raise RegistryError(f"{name}: targets must be 'labels' or 'one_hot', got {targets!r}")
    return _register(Primitive(name, "loss", hand, reference, (), MappingProxyType({}),
                               targets=targets,
                               forbid_last_layer=MappingProxyType(dict(forbid_last_layer or {})),
                               module=_caller_module()))


def unregister(name: str) -> None:
    """Removes a registered primitive (nothing happens if there is none of that name)."""
    _REGISTRY.pop(name, None)


def _names(kind: str) -> Tuple[str, ...]:
    return tuple(n for n, p in _REGISTRY.items() if p.kind == kind)


def layer_names() -> Tuple[str, ...]:
    """The registered layers, built-in ones first, in registration order."""
    return _names("layer")


def loss_names() -> Tuple[str, ...]:
    return _names("loss")


def get(name: str, kind: str = "layer") -> Primitive:
    """The primitive registered as `name`; a ConfigError naming the known ones otherwise."""
    primitive = _REGISTRY.get(name)
    if primitive is None or primitive.kind != kind:
        known = _names(kind)
        raise ConfigError(f"unknown {kind} {name!r} (registered: {', '.join(known)})")
    return primitive


class Ops(NamedTuple):
    """Which function of each primitive a network runs through: the hand rules (`HAND`) or
    the plain twins (`REFERENCE`), with optional replacements by name.

    Hashable, so it is a static argument of jitted functions.
    """
    name: str
    use_reference: bool
    replaced: Tuple[Tuple[str, Callable], ...] = ()

    def of(self, primitive: Primitive) -> Callable:
        """The function run for `primitive`."""
        for name, function in self.replaced:
            if name == primitive.name:
                return function
        return primitive.reference if self.use_reference else primitive.hand

    def replace(self, name: str, **functions: Callable) -> "Ops":
        """A new Ops called `name` with `functions` (by primitive name) swapped in."""
        return Ops(name, self.use_reference, self.replaced + tuple(functions.items()))


HAND = Ops("hand", False)
REFERENCE = Ops("reference", True)
