"""Where and how a model runs for inference: :class:`ModelRunner`, on PyTorch or OpenVINO.

:class:`ModelRunner` is the one place that turns (model, device, precision, runtime) into something
that runs a batch; the predictor (and through it evaluation, bulk prediction and the service), the
benchmarks and the GPU check all run models through it. It never modifies the caller's model.

``torch`` (the default) runs the model as it is, at the precision that
:func:`sharedris.precision.prepare_model` sets up. ``openvino`` converts the model with
``openvino.convert_model`` (traced on an example batch; batch size and text length stay dynamic)
and compiles it with OpenVINO's CPU plugin at fp32 or bf16 (its ``INFERENCE_PRECISION_HINT``).
On a CPU with AVX-512-BF16 but no AMX, PyTorch's CPU attention kernel gains nothing from bf16
and its bf16 pass stays near 2x fp32; OpenVINO's bf16 ran 3.15x PyTorch fp32 there
(``sharedris_base``, docs/benchmarks.md). It needs the ``openvino`` extra (``pip install 'sharedris[openvino]'``);
converting and compiling take seconds when the predictor is built (on a 2-core CPU: 7-9 s for
the default model, 28 s for ``sharedris_base``).
"""

from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import torch
from torch import Tensor, nn

from sharedris.modeling.segmenter import SegmenterOutput
from sharedris.precision import autocast_context, prepare_model, resolve_precision

RUNTIMES = ("torch", "openvino")
# The inference defaults of every door, the library's and the command line's alike. auto precision is
# bf16 only where bf16 runs fast (sharedris.precision), where it scored within 0.001 oIoU of fp32.
DEFAULT_DEVICE = "cpu"
DEFAULT_PRECISION = "auto"
DEFAULT_RUNTIME = "torch"
DEFAULT_PRESENCE_THRESHOLD = 0.5
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # ours -> OpenVINO's inference precision hint


class RuntimeChoiceError(ValueError):
    """A runtime that cannot run here, or with that precision; the message says why."""


def check_runtime_name(runtime: str) -> None:
    """Refuse, with one sentence, a runtime that is not one of :data:`RUNTIMES`."""
    if runtime not in RUNTIMES:
        raise RuntimeChoiceError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


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


class OpenVINOModel(nn.Module):
    """A Shared-RIS model compiled by OpenVINO, called like the model: (image, ids, pad) -> output.

    Args:
        model: the Shared-RIS model on the CPU in eval mode, converted as it is (:class:`ModelRunner`
            hands it a copy in that state when the caller's model is not).
        precision: ``fp32`` or ``bf16``.
        threads: OpenVINO's inference threads; None = torch's thread count.
    """

    def __init__(self, model: nn.Module, precision: str, threads: int | None = None) -> None:
        super().__init__()
        try:
            import openvino
        except ImportError:
            raise ImportError("runtime openvino needs the openvino package: pip install 'sharedris[openvino]'") from None
        cfg = model.config
        self.config = cfg
        # an example batch of 2 with padding in one row only, so neither is baked into the graph
        S, L = cfg.image_size, cfg.text_len
        pad = torch.zeros(2, L, dtype=torch.bool)
        pad[1, L // 2:] = True
        example = (torch.zeros(2, 3, S, S), torch.full((2, L), 5, dtype=torch.long), pad)
        inputs = [("image", [-1, 3, S, S], openvino.Type.f32), ("text_ids", [-1, -1], openvino.Type.i64),
                  ("text_padding_mask", [-1, -1], openvino.Type.boolean)]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape checks it records as constants
            converted = openvino.convert_model(model, example_input=example, input=inputs)
        self.compiled = openvino.Core().compile_model(converted, "CPU", {
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()})
        self._requests = threading.local()
        # the outputs are the fields of SegmenterOutput that the model has, in order
        self.fields = ["mask_logits"] + [name for name, flag in (("presence_logits", cfg.decoder.presence_head),
                                                                 ("iou_pred", cfg.decoder.iou_head)) if flag]

    def forward(self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> SegmenterOutput:
        """The model's output for a batch; tensors on the CPU, float32."""
        if text_padding_mask is None:
            text_padding_mask = torch.zeros_like(text_ids, dtype=torch.bool)
        request = getattr(self._requests, "request", None)
        if request is None:  # one inference request per calling thread: a request serves one call at a time
            request = self._requests.request = self.compiled.create_infer_request()
        result = request.infer({"image": image.float().numpy(), "text_ids": text_ids.numpy(),
                                "text_padding_mask": text_padding_mask.numpy()})
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
        check_runtime(runtime, self.precision, self.device)
        self.runtime = runtime
        self.config = model.config
        target = torch.device("cpu") if runtime == "openvino" else self.device
        as_is = _same_device(model, target) and not model.training
        own = model if as_is else copy.deepcopy(model).to(target).eval()
        if runtime == "openvino":
            self.module, self.amp_dtype = OpenVINOModel(own, self.precision, threads), None
        else:
            self.module, self.amp_dtype = prepare_model(own, self.precision, self.device, copy=as_is)

    @torch.inference_mode()
    def __call__(self, images: Tensor, ids: Tensor, pad: Tensor) -> SegmenterOutput:
        """The model on a batch of pairs: images (B, 3, S, S), ids (B, L), pad (B, L) (True = padding).

        Inputs are moved to the runner's device; the outputs are float32, on that device.
        """
        with autocast_context(self.device, self.amp_dtype):
            out = self.module(images.to(self.device), ids.to(self.device), pad.to(self.device))
        return SegmenterOutput(*(None if t is None else t.float() for t in out))
