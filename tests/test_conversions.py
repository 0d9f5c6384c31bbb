"""The cache of converted models: entries whole or absent, damage rebuilt, unwritable folders only
cost time, concurrent writers, and keys that change with the weights and the code."""

import ctypes
import gc
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from _tiny_model import save_tiny_model, scene

from sharedris import Predictor, load_pretrained, runtime
from sharedris.conversions import LIMIT, MANIFEST, SWITCH, ConversionCache
from sharedris.modeling.segmenter import INFERENCE_FIELDS
from sharedris.runtime import OpenVINOModel, resolve_runtime


def _fill(payload: bytes):
    return lambda folder: (folder / "data.bin").write_bytes(payload)


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_an_entry_reads_back_as_written(tmp_path):
    cache = ConversionCache(tmp_path / "c")
    assert cache.read("k1") is None
    assert cache.write("k1", lambda f: ((f / "a.xml").write_text("<a/>"), (f / "b.bin").write_bytes(b"\x00\x01")))
    assert cache.read("k1") == {"a.xml": b"<a/>", "b.bin": b"\x00\x01"}
    assert json.loads((tmp_path / "c" / "k1" / MANIFEST).read_text())["b.bin"]["size"] == 2
    assert _leftovers(tmp_path / "c") == []  # no temporary folder stays behind


@pytest.mark.parametrize("damage", ["cut short", "one byte changed", "file gone", "manifest gone", "manifest garbled"])
def test_a_damaged_entry_is_removed_and_can_be_written_again(tmp_path, damage):
    cache = ConversionCache(tmp_path)
    cache.write("k", _fill(b"weights" * 100))
    entry = tmp_path / "k"
    data = entry / "data.bin"
    if damage == "cut short":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "one byte changed":
        raw = bytearray(data.read_bytes())
        raw[5] ^= 1
        data.write_bytes(bytes(raw))
    elif damage == "file gone":
        data.unlink()
    elif damage == "manifest gone":
        (entry / MANIFEST).unlink()
    else:
        (entry / MANIFEST).write_text("{not json")
    assert cache.read("k") is None
    assert not entry.exists() and _leftovers(tmp_path) == []
    assert cache.write("k", _fill(b"new")) and cache.read("k") == {"data.bin": b"new"}


def test_a_folder_that_cannot_be_written_warns_once_and_keeps_nothing(tmp_path):
    (tmp_path / "file").write_text("in the way")
    cache = ConversionCache(tmp_path / "file" / "cache")  # its parent is a file: no folder can be made there
    with pytest.warns(UserWarning, match="cannot keep converted models in .*each start will convert again"):
        assert not cache.write("k", _fill(b"x"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure stays silent
        assert not cache.write("k2", _fill(b"x"))
    assert cache.read("k") is None


def test_a_read_only_folder_keeps_nothing_and_the_model_still_runs(tmp_path, monkeypatch):
    # Permission bits do not stop root (as in CI), so the refusal a read-only folder gives any
    # other user is played by the call that makes the entry's temporary folder.
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("sharedris.conversions.tempfile.mkdtemp", refused)
    monkeypatch.setenv("SHAREDRIS_HOME", str(tmp_path))
    model = load_pretrained(save_tiny_model(tmp_path / "tiny"))
    with pytest.warns(UserWarning, match="Permission denied"):
        compiled = OpenVINOModel(model, "fp32", threads=1, cache=ConversionCache.default())
    assert compiled.source == "converted" and not any((tmp_path / "conversions").glob("*"))
    image, ids, pad = torch.zeros(1, 3, 64, 64), torch.full((1, 24), 7), torch.zeros(1, 24, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(compiled(image, ids, pad).mask_logits, model(image, ids, pad).mask_logits, atol=1e-4)


def test_two_processes_filling_one_entry_leave_one_whole_entry(tmp_path):
    # Both writers fill 4 MB and then wait for each other, so that both renames race for the entry.
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from sharedris.conversions import ConversionCache
        me = sys.argv[1]
        def fill(folder):
            (folder / "data.bin").write_bytes(me.encode() * (4 << 20))
            Path({str(tmp_path)!r}, me).touch()
            while len(list(Path({str(tmp_path)!r}).glob("w*"))) < 2:
                time.sleep(0.01)
        print(ConversionCache({str(tmp_path / "c")!r}).write("k", fill))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, f"w{i}"], stdout=subprocess.PIPE, text=True)
             for i in (1, 2)]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outputs == ["True", "True"]
    files = ConversionCache(tmp_path / "c").read("k")
    assert files is not None and files["data.bin"] in (b"w1" * (4 << 20), b"w2" * (4 << 20))
    assert _leftovers(tmp_path / "c") == []


def test_the_switch_turns_the_cache_off(monkeypatch, tmp_path):
    monkeypatch.setenv("SHAREDRIS_HOME", str(tmp_path))
    assert ConversionCache.default().root == tmp_path / "conversions"
    for value in ("off", "0", "false"):
        monkeypatch.setenv(SWITCH, value)
        assert ConversionCache.default() is None


def _last_used(root, key, seconds_ago):
    stamp = time.time() - seconds_ago
    os.utime(root / key / MANIFEST, (stamp, stamp))


def test_the_size_limit_removes_the_entries_used_longest_ago(tmp_path):
    cache = ConversionCache(tmp_path, max_bytes=250)
    for age, key in ((300, "a"), (200, "b")):
        assert cache.write(key, _fill(bytes(100)))
        _last_used(tmp_path, key, age)
    assert cache.read("a") is not None  # reading marks "a" used now: "b" is the one used longest ago
    assert cache.write("c", _fill(bytes(100)))  # 300 bytes > 250: one entry must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c"]
    assert cache.write("big", _fill(bytes(400)))  # alone over the limit: the new entry still stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"] and cache.read("big") == {"data.bin": bytes(400)}


def test_pruning_removes_only_temporary_folders_of_dead_processes(tmp_path):
    cache = ConversionCache(tmp_path)
    old, fresh = tmp_path / ".0123.abc.tmp", tmp_path / ".4567.def.tmp"
    for folder, age in ((old, 2 * 3600), (fresh, 10)):
        folder.mkdir()
        (folder / "part.bin").write_bytes(b"x")
        os.utime(folder, (time.time() - age, time.time() - age))
    assert cache.write("k", _fill(b"data"))
    assert _leftovers(tmp_path) == [fresh.name]  # a writer may still be filling that one


def test_the_size_limit_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(LIMIT, "0.5")
    assert ConversionCache(tmp_path).max_bytes == 500_000_000
    monkeypatch.delenv(LIMIT)
    assert ConversionCache(tmp_path).max_bytes == 8_000_000_000
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(LIMIT, bad)
        with pytest.raises(ValueError, match=f"{LIMIT}=.*size limit in GB"):
            ConversionCache(tmp_path)


# ------------------------------------------------------------------------- OpenVINO through the cache
@pytest.fixture
def cached(tmp_path):
    """(model, cache, a batch) with an empty cache."""
    model = load_pretrained(save_tiny_model(tmp_path / "tiny", seed=3))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 3, 64, 64, generator=g), torch.randint(4, 100, (2, 24), generator=g),
             torch.zeros(2, 24, dtype=torch.bool))
    return model, ConversionCache(tmp_path / "cache"), batch


def _check_runs_as(compiled, model, batch):
    with torch.no_grad():
        want = model(*batch)
    got = compiled(*batch)
    assert want.anchor_logits is got.anchor_logits is None  # a training-only output
    for name in INFERENCE_FIELDS:
        assert torch.allclose(getattr(want, name), getattr(got, name), atol=1e-4), name


def test_the_second_start_reads_the_compiled_model_and_runs_the_same(cached):
    model, cache, batch = cached
    first = OpenVINOModel(model, "fp32", threads=1, cache=cache)
    second = OpenVINOModel(model, "fp32", threads=1, cache=cache)
    assert (first.source, second.source) == ("converted", "compiled model from cache")
    assert torch.equal(first(*batch).mask_logits, second(*batch).mask_logits)
    _check_runs_as(second, model, batch)
    # another precision compiles the converted model read from the cache
    assert OpenVINOModel(model, "bf16", threads=1, cache=cache).source == "converted model from cache"


def test_changed_weights_or_code_convert_again(cached, monkeypatch):
    model, cache, batch = cached
    OpenVINOModel(model, "fp32", threads=1, cache=cache)
    with torch.no_grad():
        model.decoder.presence_mlp[-1].bias.add_(3.0)
    changed = OpenVINOModel(model, "fp32", threads=1, cache=cache)
    assert changed.source == "converted"
    _check_runs_as(changed, model, batch)  # the new weights, not the cached ones
    monkeypatch.setattr(runtime, "_code_digest", lambda: "other modeling code")
    assert OpenVINOModel(model, "fp32", threads=1, cache=cache).source == "converted"


def test_a_damaged_conversion_is_converted_again(cached):
    model, cache, batch = cached
    OpenVINOModel(model, "fp32", threads=1, cache=cache)
    entries = {p: (p / MANIFEST).read_text() for p in cache.root.iterdir()}
    for entry, manifest in entries.items():
        big = max(json.loads(manifest), key=lambda name: json.loads(manifest)[name]["size"])
        raw = bytearray((entry / big).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (entry / big).write_bytes(bytes(raw))
    again = OpenVINOModel(model, "fp32", threads=1, cache=cache)
    assert again.source == "converted"
    _check_runs_as(again, model, batch)
    assert OpenVINOModel(model, "fp32", threads=1, cache=cache).source == "compiled model from cache"


def test_models_read_from_the_cache_outlive_their_entry_being_cut_short(tmp_path):
    # OpenVINO maps an IR's weights file into memory when it reads the IR from a path: cutting that
    # file short under a running model kills the process with SIGBUS. The cache reads entries into
    # memory, so damage done to an entry later (by a test, a user, another process) cannot reach a
    # model already built from it. In a subprocess, so that a crash fails this test alone.
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from _tiny_model import tiny_model
        from sharedris.conversions import ConversionCache
        from sharedris.runtime import OpenVINOModel
        model, cache = tiny_model(seed=2).eval(), ConversionCache({str(tmp_path / "c")!r})
        OpenVINOModel(model, "fp32", threads=1, cache=cache)
        built = [OpenVINOModel(model, p, threads=1, cache=cache) for p in ("fp32", "bf16")]
        print(*(m.source for m in built), sep=", ")
        for entry in cache.root.iterdir():
            for f in entry.iterdir():
                f.write_bytes(b"")  # cut short in place: same file, no rename
        batch = (torch.zeros(1, 3, 64, 64), torch.full((1, 24), 5), torch.zeros(1, 24, dtype=torch.bool))
        print(all(torch.isfinite(m(*batch).mask_logits).all() for m in built))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:2] == ["compiled model from cache, converted model from cache", "True"]


def test_models_from_the_cache_keep_no_hold_on_the_bytes_read(cached, monkeypatch):
    # the model is built from bytes read whole from the entry and then dropped: OpenVINO must have
    # copied what it needs, so scribbling over those bytes afterwards changes nothing
    model, cache, batch = cached
    OpenVINOModel(model, "fp32", threads=1, cache=cache)  # fills both entries
    read, given = cache.read, []
    monkeypatch.setattr(cache, "read", lambda key: given.append(read(key)) or given[-1])
    with torch.no_grad():
        want = model(*batch)
    for precision in ("fp32", "bf16"):  # the compiled model, then the converted one compiled here
        built = OpenVINOModel(model, precision, threads=1, cache=cache)
        first = built(*batch).mask_logits
        for files in filter(None, given):
            for data in files.values():
                ctypes.memset(ctypes.c_char_p(data), 0x7F, len(data))
        assert torch.equal(built(*batch).mask_logits, first)
    assert torch.allclose(first, want.mask_logits, atol=0.1)  # bf16, from the converted model


def _signal_stack() -> tuple[int | None, int, int]:
    """This thread's alternate signal stack: (address, flags, size), from sigaltstack(2)."""
    stack = (ctypes.c_void_p * 3)()  # stack_t on x86-64 and aarch64 Linux: pointer, int (padded), size_t
    assert ctypes.CDLL(None).sigaltstack(None, stack) == 0
    return stack[0], ctypes.cast(stack, ctypes.POINTER(ctypes.c_int))[2], stack[2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack(2) read through Linux's libc")
def test_building_and_freeing_models_leaves_the_signal_stack_as_it_was(cached):
    # OpenVINO gives the thread that compiles or imports a model an alternate signal stack and frees
    # it with the model: a thread left on it wrote its next signal frame into freed memory, and died
    # with SIGSEGV at a handled signal (a child ending under PyTorch's DataLoader SIGCHLD handler)
    model, cache, batch = cached
    before = _signal_stack()
    built = [OpenVINOModel(model, precision, threads=1, cache=cache) for precision in ("fp32", "fp32", "bf16")]
    assert [m.source for m in built] == ["converted", "compiled model from cache", "converted model from cache"]
    built[1](*batch)
    assert _signal_stack() == before
    del built
    gc.collect()
    assert _signal_stack() == before


def test_a_signal_stack_that_cannot_be_given_back_is_switched_off(monkeypatch):
    calls = []

    class FakeLibc:  # reading the stack works; setting it back fails (e.g. too small for the CPU's state)
        def sigaltstack(self, new, old):
            calls.append(None if new is None else ctypes.cast(new, ctypes.POINTER(runtime._SignalStack)).contents.ss_flags)
            return 0 if new is None else -1

    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name, use_errno=False: FakeLibc())
    with runtime._signal_stack_kept():
        calls.append("block")
    assert calls[:2] == [None, "block"] and calls[-1] == runtime._SS_DISABLE and len(calls) == 4

    monkeypatch.setattr(runtime.sys, "platform", "darwin")  # elsewhere the block runs as it is, libc untouched
    calls.clear()
    with runtime._signal_stack_kept():
        calls.append("block")
    assert calls == ["block"]


def test_two_processes_starting_one_model_on_a_cold_cache(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny", seed=5)
    scene(40, 30).save(tmp_path / "a.png")
    env = {**os.environ, "SHAREDRIS_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "sharedris", "predict", str(tmp_path / "a.png"), "-t", "the box", "--model",
           str(model_dir), "--json", "--precision", "fp32", "--runtime", "openvino"]
    procs = [subprocess.Popen([*cmd, "-o", str(tmp_path / f"p{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    answers = [json.loads(o[0])["results"][0] for o in outs]
    assert answers[0]["present"] == pytest.approx(answers[1]["present"], abs=1e-6)
    cache = ConversionCache(tmp_path / "home" / "conversions")
    assert len([p for p in cache.root.iterdir() if not p.name.startswith(".")]) == 2  # converted + compiled
    assert _leftovers(cache.root) == []
    assert OpenVINOModel(load_pretrained(model_dir), "fp32", cache=cache).source == "compiled model from cache"


# ------------------------------------------------------------------------------ runtime "auto"
def test_auto_is_openvino_on_a_cpu_at_fp32_or_bf16_when_installed(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_runtime("auto", "fp32", cpu) == resolve_runtime("auto", "bf16", cpu) == "openvino"
    assert resolve_runtime("auto", "int8", cpu) == "torch"
    assert resolve_runtime("auto", "bf16", torch.device("cuda")) == "torch"
    assert resolve_runtime("torch", "bf16", cpu) == "torch"  # a named runtime is kept
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    assert resolve_runtime("auto", "bf16", cpu) == "torch"


def test_a_predictor_runs_what_auto_picks(model_dir):
    assert Predictor(load_pretrained(model_dir), precision="fp32", runtime="auto").runtime == "openvino"
    assert Predictor(load_pretrained(model_dir), precision="int8", runtime="auto").runtime == "torch"
