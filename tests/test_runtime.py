"""jaxbp.runtime: the CPU defaults that importing jaxbp applies, and the switch that turns
them off."""
import os
import platform
import subprocess
import sys

import pytest

from jaxbp import runtime

YNN = "--xla_cpu_experimental_ynn_fusion_type"


@pytest.mark.parametrize("value,enabled", [(None, True), ("1", True), ("yes", True),
                                           ("0", False), ("false", False), (" OFF ", False),
                                           ("no", False)])
def test_tuning_switch(value, enabled):
    environ = {} if value is None else {runtime.TUNING_VARIABLE: value}
    assert runtime.tuning_enabled(environ) is enabled


@pytest.mark.parametrize("current,expected", [
    ("", f"{YNN}=reduce"),
    ("--xla_dump_to=/tmp/d", f"--xla_dump_to=/tmp/d {YNN}=reduce"),
    (f"{YNN}=dot --xla_cpu_enable_fast_math=false", f"{YNN}=dot --xla_cpu_enable_fast_math=false"),
])
def test_xla_flags_are_appended_unless_the_user_set_them(current, expected):
    assert runtime.with_xla_flags(current) == expected
    assert runtime.with_xla_flags(runtime.with_xla_flags(current)) == expected


def _python(code: str, **environ) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (JAX's backend not started), warnings shown."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", runtime.TUNING_VARIABLE)}
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                          text=True, env={**env, **environ})
    assert done.returncode == 0, done.stderr
    return done


REPORT = ("import os, jaxbp; from jaxbp import runtime; "
          "print(os.environ.get('XLA_FLAGS')); print(runtime.applied())")
STARTED_FIRST = "import jax.numpy as jnp; jnp.ones(2).block_until_ready(); " + REPORT


def test_importing_jaxbp_applies_the_defaults():
    out = _python(REPORT, XLA_FLAGS="--xla_dump_to=/tmp/d").stdout.splitlines()
    assert out[0] == f"--xla_dump_to=/tmp/d {YNN}=reduce"
    assert f"XLA_FLAGS={out[0]}" in out[1]
    if "glibc" in platform.libc_ver()[0]:
        assert "mallopt(" in out[1]


def test_importing_jaxbp_after_the_backend_started_warns_once():
    done = _python(STARTED_FIRST + "; runtime.configure_on_import()")
    flags, applied = done.stdout.splitlines()
    assert flags == "None" and "XLA_FLAGS" not in applied, "too late: left alone"
    assert done.stderr.count("TuningWarning") == 1, done.stderr
    assert "Import jaxbp before the first JAX computation" in done.stderr
    assert f"XLA_FLAGS={YNN}=reduce" in done.stderr


def test_no_warning_when_the_user_set_the_flag():
    done = _python(STARTED_FIRST, XLA_FLAGS=f"{YNN}=reduce")
    assert "TuningWarning" not in done.stderr


@pytest.mark.parametrize("started", [False, True], ids=["fresh", "backend started"])
def test_tuning_off_applies_nothing_and_warns_nothing(started):
    done = _python(STARTED_FIRST if started else REPORT, **{runtime.TUNING_VARIABLE: "0"})
    assert done.stdout.splitlines() == ["None", "[]"]
    assert "TuningWarning" not in done.stderr


@pytest.mark.parametrize("tuning,enabled", [(None, True), ("1", True), ("0", False),
                                           ("off", False)])
def test_formulations_follow_the_tuning_switch(monkeypatch, tuning, enabled):
    """Only the switch: which platform a chosen formulation runs on is settled where the
    computation is compiled (`lax.platform_dependent`; tests/test_fast.py lowers for CUDA)."""
    if tuning is None:
        monkeypatch.delenv(runtime.TUNING_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(runtime.TUNING_VARIABLE, tuning)
    assert runtime.formulations_enabled() is enabled
