"""jaxbp.runtime: the CPU defaults the CLI applies, and the switch that turns them off."""
import os
import platform

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


def test_configure_before_the_backend_starts(monkeypatch):
    monkeypatch.setattr(runtime, "_backend_started", lambda: False)
    monkeypatch.setattr(runtime, "_set_malloc_options", lambda: True)
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    applied = runtime.configure(environ)
    assert environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/d {YNN}=reduce"
    assert applied[0] == f"XLA_FLAGS={environ['XLA_FLAGS']}"
    assert runtime.configure(environ)[0].startswith("mallopt"), "flags are added only once"


def test_configure_leaves_flags_alone_once_the_backend_runs(monkeypatch):
    monkeypatch.setattr(runtime, "_backend_started", lambda: True)
    monkeypatch.setattr(runtime, "_set_malloc_options", lambda: False)
    environ = {}
    assert not any(a.startswith("XLA_FLAGS") for a in runtime.configure(environ))
    assert "XLA_FLAGS" not in environ


def test_tuning_off_applies_nothing(monkeypatch):
    monkeypatch.setattr(runtime, "_set_malloc_options", lambda: pytest.fail("mallopt called"))
    environ = {runtime.TUNING_VARIABLE: "0"}
    assert runtime.configure(environ) == []
    assert environ == {runtime.TUNING_VARIABLE: "0"}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps") or "glibc" not in platform.libc_ver()[0],
                    reason="mallopt is glibc's")
def test_malloc_options_are_accepted_by_glibc():
    assert runtime._set_malloc_options()


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
