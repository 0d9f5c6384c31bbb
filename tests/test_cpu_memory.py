"""Running on the CPU sets malloc to reuse freed memory instead of mapping fresh pages every time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from sharedris import devices, runtime

# keep_freed_memory(), then rounds of three 24 MiB blocks (an activation's size at 480 px) taken,
# written and freed with the C library's malloc: the page faults of five rounds after two.
_FAULTS = textwrap.dedent("""
    import ctypes, resource
    from sharedris.devices import keep_freed_memory
    applied = keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    def one_round():
        blocks = [libc.malloc(24 << 20) for _ in range(3)]
        for b in blocks:
            libc.memset(b, 1, 24 << 20)
        for b in blocks:
            libc.free(b)
    one_round(); one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        one_round()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(switch: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != devices.MALLOC_SWITCH}
    if switch is not None:
        env[devices.MALLOC_SWITCH] = switch
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's (Linux)")
def test_freed_blocks_are_reused_unless_switched_off():
    assert _faults(None) == ("True", 0)
    applied, faults = _faults("off")
    assert applied == "False" and faults > 0.9 * 5 * 3 * (24 << 20) / 4096  # nearly every page, every round


def test_the_switch_and_a_c_library_without_mallopt_leave_malloc_alone(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(devices.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(devices.sys, "platform", "linux")
    for value in ("off", "0"):
        monkeypatch.setenv(devices.MALLOC_SWITCH, value)
        devices.keep_freed_memory.cache_clear()
        assert devices.keep_freed_memory() is False and calls == []
    monkeypatch.delenv(devices.MALLOC_SWITCH)
    devices.keep_freed_memory.cache_clear()
    assert devices.keep_freed_memory() is True
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]

    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(devices.ctypes, "CDLL", no_libc)
    devices.keep_freed_memory.cache_clear()
    assert devices.keep_freed_memory() is False
    devices.keep_freed_memory.cache_clear()


def test_a_pytorch_runner_on_the_cpu_sets_it_and_an_openvino_one_does_not(monkeypatch):
    from _tiny_model import tiny_model

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setenv("SHAREDRIS_CONVERSION_CACHE", "off")
    runtime.ModelRunner(tiny_model().eval(), "cpu", precision="fp32", runtime="torch")
    assert calls == [1]
    runtime.ModelRunner(tiny_model().eval(), "cpu", precision="fp32", runtime="openvino")
    assert calls == [1]
