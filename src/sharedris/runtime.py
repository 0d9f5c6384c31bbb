"""Where and how a model runs for inference: :class:`ModelRunner`, on PyTorch or OpenVINO.

:class:`ModelRunner` is the one place that turns (model, device, precision, runtime) into something
that runs a batch; the predictor (and through it evaluation, bulk prediction and the service), the
benchmarks and the GPU check all run models through it. It never modifies the caller's model.

Runtimes:

- ``torch`` runs the model as it is, at the precision that :func:`sharedris.precision.prepare_model`
  sets up.
- ``openvino`` converts the model with ``openvino.convert_model`` (traced on an example batch; batch
  size and text length stay dynamic) and compiles it with OpenVINO's CPU plugin at fp32 or bf16
  (its ``INFERENCE_PRECISION_HINT``) twice: with its inputs fixed to one pair at the model's text
  length (what the tokenizer always gives), for the commonest call, one expression, which a
  compiled model that knows every shape in advance runs faster (docs/benchmarks.md); and as
  converted, for any other batch, at the first such call. Converting and compiling take seconds,
  so the results are kept in the user's cache folder (:mod:`sharedris.conversions`), keyed by the
  model's config and weights, the code that shapes the graph and the OpenVINO and torch versions
  (the compiled models also by their input shapes, the CPU, precision and thread count): only a
  model's first start pays for them. It needs the ``openvino`` package (a dependency of sharedris).
- ``auto`` (the default of every door): OpenVINO on a CPU at fp32 or bf16 when the ``openvino``
  package is installed, PyTorch otherwise (GPUs, int8, no OpenVINO); :func:`resolve_runtime`.
  OpenVINO was the fastest path measured on the CPUs in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import hashlib
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from sharedris import modeling
from sharedris.conversions import ConversionCache, digest
from sharedris.devices import keep_freed_memory
from sharedris.modeling.segmenter import SegmenterOutput
from sharedris.precision import autocast_context, prepare_model, resolve_precision

RUNTIMES = ("auto", "torch", "openvino")
# The inference defaults of every door, the library's and the command line's alike. auto precision is
# bf16 only where bf16 runs fast (sharedris.precision), where it scored within 0.001 oIoU of fp32.
DEFAULT_DEVICE = "cpu"
DEFAULT_PRECISION = "auto"
DEFAULT_RUNTIME = "auto"
DEFAULT_PRESENCE_THRESHOLD = 0.5
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # ours -> OpenVINO's inference precision hint


class RuntimeChoiceError(ValueError):
    """A runtime that cannot run here, or with that precision; the message says why."""


def check_runtime_name(runtime: str) -> None:
    """Refuse, with one sentence, a runtime that is not one of :data:`RUNTIMES`."""
    if runtime not in RUNTIMES:
        raise RuntimeChoiceError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_runtime(runtime: str, precision: str, device: torch.device) -> str:
    """The concrete runtime for ``runtime`` (``auto`` resolved), the precision and the device.

    ``auto`` is OpenVINO on a CPU at fp32 or bf16 when the ``openvino`` package is installed (the
    fastest path measured on CPUs: docs/benchmarks.md), and PyTorch otherwise (GPUs, int8, no OpenVINO).

    Args:
        runtime: one of :data:`RUNTIMES`.
        precision: the concrete precision (``fp32``, ``bf16`` or ``int8``).
        device: where the model runs.
    """
    check_runtime_name(runtime)
    if runtime != "auto":
        return runtime
    if device.type == "cpu" and precision in OPENVINO_PRECISIONS and openvino_installed():
        return "openvino"
    return "torch"


def check_runtime(runtime: str, precision: str, device: torch.device) -> None:
    """Refuse, with one sentence, a runtime this machine or this precision cannot use.

    Args:
        runtime: one of :data:`RUNTIMES`.
        precision: the concrete precision (``fp32``, ``bf16`` or ``int8``).
        device: where the predictor runs.
    """
    check_runtime_name(runtime)
    if runtime == "openvino":
        if device.type != "cpu":
            raise RuntimeChoiceError(f"runtime openvino runs on the CPU only, not on {device}; use runtime torch there")
        if precision not in OPENVINO_PRECISIONS:
            raise RuntimeChoiceError(f"runtime openvino runs fp32 or bf16, not {precision}; use runtime torch for int8")


class _PresentOutputs(nn.Module):
    """``model`` returning only the outputs it has, as a tuple: tracing refuses the None of a missing head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor) -> tuple[Tensor, ...]:
        return tuple(t for t in self.model(image, text_ids, text_padding_mask) if t is not None)


def _convert(openvino: Any, model: nn.Module) -> Any:
    """``openvino.convert_model`` of ``model``, with batch size and text length left dynamic."""
    # an example batch of 2 with padding in one row only, so neither is baked into the graph
    S, L = model.config.image_size, model.config.text_len
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[1, L // 2:] = True
    example = (torch.zeros(2, 3, S, S), torch.full((2, L), 5, dtype=torch.long), pad)
    inputs = [("image", [-1, 3, S, S], openvino.Type.f32), ("text_ids", [-1, -1], openvino.Type.i64),
              ("text_padding_mask", [-1, -1], openvino.Type.boolean)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape checks it records as constants
        # share_weights=False: OpenVINO copies the weights. Shared, a compiled fp32 model reads the
        # PyTorch tensors it was converted from, and crashes once they are freed (a runner's copy is)
        return openvino.convert_model(_PresentOutputs(model), example_input=example, input=inputs,
                                      share_weights=False)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (hex) of a model's state: every tensor's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """SHA-256 (hex) of the code that shapes a converted graph: the modeling package and this module."""
    files = sorted(Path(modeling.__file__).parent.glob("*.py")) + [Path(__file__)]
    return digest(*(hashlib.sha256(f.read_bytes()).hexdigest() for f in files))


class _SignalStack(ctypes.Structure):
    """``stack_t`` of sigaltstack(2) on Linux."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_SS_DISABLE = 2


@contextlib.contextmanager
def _signal_stack_kept() -> Iterator[None]:
    """Give this thread back, after the block, the alternate signal stack it had before it.

    OpenVINO's CPU plugin, when it compiles or imports a model, leaves the calling thread on an
    alternate signal stack that it frees together with the model. The thread keeps pointing at the
    freed memory, and the next signal it handles (e.g. a child process ending under the ``SIGCHLD``
    handler that PyTorch's DataLoader installs) is written there: where that memory is unmapped,
    the kernel kills the process with SIGSEGV. Linux only (elsewhere the block runs as it is).
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    before = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        if libc.sigaltstack(ctypes.byref(before), None) != 0:  # e.g. too small for this CPU's state now
            libc.sigaltstack(ctypes.byref(_SignalStack(None, _SS_DISABLE, 0)), None)


class OpenVINOModel(nn.Module):
    """A Shared-RIS model compiled by OpenVINO, called like the model: (image, ids, pad) -> output.

    Two compiled models run it: one with every input shape fixed to a single pair at the model's
    text length (:attr:`single_shapes`), built with this object, which answers such calls; and one
    with dynamic batch size and text length, built at the first call of any other shape, which
    answers those. The converted model and each compiled one (for this CPU, precision and thread
    count) are kept in ``cache`` (:mod:`sharedris.conversions`) and read from it on later starts.
    Until the dynamic one is built, this object keeps a reference to ``model``, to convert it again
    when the cache does not hold the conversion then (e.g. ``cache`` None).

    Args:
        model: the Shared-RIS model on the CPU in eval mode, converted as it is (:class:`ModelRunner`
            hands it a copy in that state when the caller's model is not).
        precision: ``fp32`` or ``bf16``.
        threads: OpenVINO's inference threads; None = torch's thread count.
        cache: where conversions are kept; None keeps nothing.

    Attributes:
        weights_sha256: :func:`weights_digest` of the model it was converted from.
        source: how the compiled model for one pair was obtained: ``"converted"``, ``"converted model
            from cache"`` (compiled here) or ``"compiled model from cache"``.
        single_shapes: the input shapes of the fixed-shape compiled model, by input name.
        single: that compiled model.
    """

    def __init__(self, model: nn.Module, precision: str, threads: int | None = None,
                 cache: ConversionCache | None = None) -> None:
        super().__init__()
        try:
            import openvino
        except ImportError:
            raise ImportError("runtime openvino needs the openvino package: pip install openvino") from None
        cfg = model.config
        self.config = cfg
        S, L = cfg.image_size, cfg.text_len
        self.single_shapes = {"image": [1, 3, S, S], "text_ids": [1, L], "text_padding_mask": [1, L]}
        self._cache = cache
        self._convert: Callable[[], Any] | None = lambda: _convert(openvino, model)  # a closure: no submodule
        self._dynamic: Any = None
        self._lock = threading.Lock()
        with _signal_stack_kept():
            self._core = openvino.Core()
            self._settings = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
                              "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
            self.weights_sha256 = weights_digest(model)
            self._key = None if cache is None else digest("openvino", dataclasses.asdict(cfg), self.weights_sha256,
                                                          _code_digest(), openvino.__version__, torch.__version__)
            self.single, self.source = self._compile(self.single_shapes)
        self._requests = threading.local()
        # the outputs are the fields of SegmenterOutput that the model has, in order
        self.fields = ["mask_logits"] + [name for name, flag in (("presence_logits", cfg.decoder.presence_head),
                                                                 ("iou_pred", cfg.decoder.iou_head)) if flag]

    def _compile(self, shapes: dict[str, list[int]] | None) -> tuple[Any, str]:
        """The compiled model with input ``shapes`` (None: dynamic) and how it was obtained (:attr:`source`)."""
        import openvino

        core, settings, cache = self._core, self._settings, self._cache
        # a compiled model is specific to the CPU (its instruction set) and to its settings too
        key = None if cache is None else digest(self._key, shapes, settings, core.get_property("CPU", "FULL_DEVICE_NAME"),
                                                core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        compiled = self._from_cache(key, lambda files: core.import_model(files["compiled.blob"], "CPU", settings))
        if compiled is not None:
            return compiled, "compiled model from cache"
        source = "converted model from cache"
        converted = self._from_cache(self._key, lambda files: core.read_model(files["model.xml"], files["model.bin"]))
        if converted is None:
            converted, source = self._convert(), "converted"
            if cache is not None:
                cache.write(self._key, lambda folder: openvino.save_model(converted, folder / "model.xml",
                                                                          compress_to_fp16=False))
        if shapes is not None:
            converted.reshape(shapes)
        compiled = core.compile_model(converted, "CPU", settings)
        if cache is not None:
            blob = compiled.export_model().getvalue()
            cache.write(key, lambda folder: (folder / "compiled.blob").write_bytes(blob))
        return compiled, source

    def _from_cache(self, key: str | None, load: Callable[[dict[str, bytes]], Any]) -> Any:
        """``load(files)`` of the cache's entry ``key``; None when there is none or OpenVINO refuses it."""
        files = None if self._cache is None else self._cache.read(key)
        if files is None:
            return None
        try:
            return load(files)  # OpenVINO copies what it reads: the bytes can go (tests/test_conversions.py)
        except Exception:  # noqa: BLE001 - checked bytes that OpenVINO still refuses: build it again
            self._cache.discard(key)
            return None

    @property
    def dynamic(self) -> Any:
        """The compiled model with dynamic batch size and text length, built at first use."""
        with self._lock:
            if self._dynamic is None:
                with _signal_stack_kept():
                    self._dynamic = self._compile(None)[0]
                self._convert = None  # the reference to the PyTorch model can go
            return self._dynamic

    def _request(self, feed: dict[str, np.ndarray]) -> Any:
        """This thread's inference request of the compiled model that takes ``feed``'s shapes.

        One request per calling thread and compiled model: a request serves one call at a time.
        """
        single = all(list(feed[name].shape) == shape for name, shape in self.single_shapes.items())
        name = "single" if single else "dynamic"
        request = getattr(self._requests, name, None)
        if request is None:
            request = (self.single if single else self.dynamic).create_infer_request()
            setattr(self._requests, name, request)
        return request

    def forward(self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> SegmenterOutput:
        """The model's output for a batch; tensors on the CPU, float32."""
        if text_padding_mask is None:
            text_padding_mask = torch.zeros_like(text_ids, dtype=torch.bool)
        feed = {"image": image.float().numpy(), "text_ids": text_ids.numpy(),
                "text_padding_mask": text_padding_mask.numpy()}
        result = self._request(feed).infer(feed)
        # copies: the request's output buffers are overwritten by this thread's next call
        named = {name: torch.from_numpy(np.array(result[i], dtype=np.float32)) for i, name in enumerate(self.fields)}
        return SegmenterOutput(*(named.get(field) for field in SegmenterOutput._fields))


def _same_device(module: nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer of ``module`` is on ``device`` (``cuda`` = the current GPU)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return all(t.device == device for t in (*module.parameters(), *module.buffers()))


class ModelRunner:
    """A model ready to run batches on ``device`` at ``precision`` through ``runtime``.

    The caller's model is never modified (device, training flag, dtype, weights): an fp32 PyTorch
    runner uses the model itself when it is already on ``device`` and in eval mode, and a copy
    otherwise; bf16 and int8 (:func:`~sharedris.precision.prepare_model`) and OpenVINO always run
    their own copy or conversion.

    Args:
        model: a Shared-RIS model (it carries its ``config``).
        device: where to run.
        precision: ``fp32``, ``bf16``, ``int8`` or ``auto`` (:func:`~sharedris.precision.resolve_precision`).
        runtime: one of :data:`RUNTIMES`.
        threads: OpenVINO's inference threads; None = torch's thread count.

    Attributes:
        device, precision (the concrete one: fp32, bf16 or int8), runtime, config: as set up.
        module: what runs (the model, its copy, or the compiled OpenVINO model).

    Raises:
        PrecisionError, RuntimeChoiceError: a precision or runtime this device cannot run.
    """

    def __init__(self, model: nn.Module, device: torch.device | str = DEFAULT_DEVICE,
                 precision: str = DEFAULT_PRECISION, runtime: str = DEFAULT_RUNTIME,
                 threads: int | None = None) -> None:
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.runtime = resolve_runtime(runtime, self.precision, self.device)
        check_runtime(self.runtime, self.precision, self.device)
        self.config = model.config
        target = torch.device("cpu") if self.runtime == "openvino" else self.device
        as_is = _same_device(model, target) and not model.training
        own = model if as_is else copy.deepcopy(model).to(target).eval()
        if self.runtime == "openvino":
            self.module = OpenVINOModel(own, self.precision, threads, ConversionCache.default())
            self.amp_dtype = None
        else:
            if self.device.type == "cpu":
                keep_freed_memory()
            self.module, self.amp_dtype = prepare_model(own, self.precision, self.device, copy=as_is)

    @torch.inference_mode()
    def __call__(self, images: Tensor, ids: Tensor, pad: Tensor) -> SegmenterOutput:
        """The model on a batch of pairs: images (B, 3, S, S), ids (B, L), pad (B, L) (True = padding).

        Inputs are moved to the runner's device; the outputs are float32, on that device.
        """
        with autocast_context(self.device, self.amp_dtype):
            out = self.module(images.to(self.device), ids.to(self.device), pad.to(self.device))
        return SegmenterOutput(*(None if t is None else t.float() for t in out))
