"""jaxbp's CPU training defaults, applied when jaxbp is imported, before JAX starts its backend.

Each was measured on the project's 2-core machine (numbers from `experiments/bench.py` and
the isolated measurements recorded in `experiments/results/README.md`):

  * XLA flag `--xla_cpu_experimental_ynn_fusion_type=reduce`. It hands reductions, and with
    them the kernel-gradient convolution (a correlation of the input with the output delta
    over the whole batch), to YNNPACK: that convolution, 32 -> 32 channels 3x3 on 128 x 28 x 28,
    went from about 530 ms of CPU time to 50-75 ms. XLA reads XLA_FLAGS when its backend
    starts, so this must happen before the first computation (importing jax is fine).
  * glibc malloc kept from returning memory to the system: one arena, no mmap'ed chunks, no
    trimming, 256 MiB of top padding (`mallopt`, the same as the MALLOC_ARENA_MAX=1
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_ MALLOC_TOP_PAD_ environment variables). By
    default every buffer over 32 MiB is a fresh mmap, zero-filled page by page on each step:
    an elementwise op on a 115 MB array took 88 ms, 14 ms with these settings.

`import jaxbp` applies them (`configure_on_import`), so a notebook or a script that uses the
library gets the same speed as the CLI. If JAX's CPU backend is already running by then, the
XLA flag can no longer take effect and jaxbp warns once (`TuningWarning`), saying how to get
it back; on a GPU backend it says nothing.

`JAXBP_TUNING=0` (or false/no/off) turns all of it off, including the per-shape choice of
formulation in the hand-written rules (`formulations_enabled`, `jaxbp.fast`), leaving JAX's
defaults. The formulations measured on the CPU run only where a computation is compiled for
the CPU; the XLA flag and malloc settings do nothing to a GPU's kernels.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import warnings
from typing import List, MutableMapping, Optional

TUNING_VARIABLE = "JAXBP_TUNING"
XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=reduce",)

# glibc's mallopt parameters (malloc.h); mallopt takes C ints, hence 2**31 - 1 as "never".
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
MALLOC_OPTIONS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1),
                  (_M_TOP_PAD, 256 << 20))

_OFF = ("0", "false", "no", "off")


def tuning_enabled(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """False when JAXBP_TUNING is 0/false/no/off (any case); on by default."""
    environ = os.environ if environ is None else environ
    return environ.get(TUNING_VARIABLE, "1").strip().lower() not in _OFF


def formulations_enabled() -> bool:
    """Whether `jaxbp.fast` may select a faster formulation of a hand rule per shape (at trace
    time): not under JAXBP_TUNING=0. Where the backend matters it is not asked here: a
    formulation measured on the CPU is staged as `lax.platform_dependent(cpu=..., default=
    plain)`, resolved for the platform the computation is compiled for."""
    return tuning_enabled()


def _missing(current: str, flags=XLA_FLAGS) -> List[str]:
    """The `flags` whose name the XLA_FLAGS string `current` does not set."""
    present = {f.split("=", 1)[0] for f in current.split()}
    return [f for f in flags if f.split("=", 1)[0] not in present]


def with_xla_flags(current: str, flags=XLA_FLAGS) -> str:
    """`current` XLA_FLAGS plus each of `flags` whose name it does not set already."""
    return " ".join([current.strip(), *_missing(current, flags)]).strip()


def _backend_started() -> bool:
    """Whether JAX has started its backend (jax keeps no public flag; False if unknowable)."""
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def _set_malloc_options() -> bool:
    """Applies MALLOC_OPTIONS through glibc's mallopt; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in MALLOC_OPTIONS)


def configure(environ: Optional[MutableMapping[str, str]] = None) -> List[str]:
    """Applies the defaults unless JAXBP_TUNING turns them off; returns what was applied.

    Call it before the first JAX computation: once the backend has started, XLA flags no
    longer take effect and are left alone. Calling it again adds nothing twice.
    """
    environ = os.environ if environ is None else environ
    if not tuning_enabled(environ):
        return []
    applied = []
    if not _backend_started():
        flags = with_xla_flags(environ.get("XLA_FLAGS", ""))
        if flags != environ.get("XLA_FLAGS", ""):
            environ["XLA_FLAGS"] = flags
            applied.append(f"XLA_FLAGS={flags}")
    if _set_malloc_options():
        applied.append("mallopt(" + ", ".join(f"{p}={v}" for p, v in MALLOC_OPTIONS) + ")")
    return applied


class TuningWarning(UserWarning):
    """jaxbp's CPU defaults could not all be applied (JAX's backend had already started)."""


_state = {"applied": [], "warned": False}


def applied() -> List[str]:
    """What importing jaxbp applied (`configure_on_import`); empty under JAXBP_TUNING=0."""
    return list(_state["applied"])


def configure_on_import(environ: Optional[MutableMapping[str, str]] = None) -> List[str]:
    """`configure`, run by `import jaxbp`; warns once if the XLA flag comes too late.

    The warning (a `TuningWarning`) is given only on the CPU backend, only when XLA_FLAGS does
    not already hold the flag, and only once per process.
    """
    environ = os.environ if environ is None else environ
    missing = _missing(environ.get("XLA_FLAGS", ""))
    if (tuning_enabled(environ) and missing and _backend_started() and not _state["warned"]
            and _running_on_cpu()):
        _state["warned"] = True
        warnings.warn(
            f"jaxbp was imported after JAX's backend started, so the XLA flag "
            f"{' '.join(missing)} cannot take effect: on the CPU the hand rules' kernel "
            f"gradients run without YNNPACK (a LeNet-5 train step measured 1.6x slower). "
            f"Import jaxbp before the first JAX computation, or start Python with "
            f"XLA_FLAGS={' '.join(missing)} (JAXBP_TUNING=0 turns jaxbp's defaults and this "
            f"warning off).", TuningWarning, stacklevel=2)
    _state["applied"] += configure(environ)
    return applied()


def _running_on_cpu() -> bool:
    import jax
    return jax.default_backend() == "cpu"
