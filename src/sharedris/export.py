"""`sharedris export onnx`: the model as an ONNX graph that onnxruntime runs (needs the ``onnx`` extra).

Graph inputs, with batch B and text length L both dynamic:
    image              (B, 3, S, S) float32, normalized with the model's mean/std (S = image size)
    text_ids           (B, L) int64, from the model's tokenizer
    text_padding_mask  (B, L) bool, True = padding
outputs (the fields of :class:`~sharedris.modeling.segmenter.SegmenterOutput` that a model in evaluation mode
returns, in order):
    mask_logits        (B, 1, S, S) float32; logit > 0 (sigmoid > 0.5) is the mask
    presence_logits    (B,) float32; sigmoid is the probability that something matches the expression
    iou_pred           (B,) float32; the predicted IoU of the mask

The post-processing that turns them into answers (the presence threshold, "no match" when the
mask has no pixel at the image's size) is :meth:`sharedris.predictor.Predictor.postprocess`.

Preprocessing and tokenizing stay outside the graph; the model's config (image size, mean/std,
text length, tokenizer file name) is stored in the graph's metadata under ``sharedris_config``.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from sharedris.modeling.beit3 import POSITION_OFFSET
from sharedris.modeling.segmenter import INFERENCE_FIELDS

INPUT_NAMES = ("image", "text_ids", "text_padding_mask")
OUTPUT_NAMES = INFERENCE_FIELDS  # one ONNX output per field, in order
_MAX_INLINE_BYTES = 1_800_000_000  # a protobuf holds at most 2 GB; above this, weights go to a .data file


def export_onnx(model: nn.Module, out: str | Path, opset: int | None = None) -> Path:
    """Write ``model`` (from :func:`sharedris.load_pretrained` or :func:`sharedris.build_model`) to ``out`` as ONNX.

    Models whose weights exceed ~1.8 GB (sharedris_large) are written with their weights in
    ``<out>.data`` beside the graph; keep the two files together.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch.onnx.export's exporter needs it
    except ImportError:
        raise ImportError("install the onnx extra: pip install 'sharedris[onnx]'") from None
    if not hasattr(model, "config"):
        raise ValueError("export_onnx needs a Shared-RIS model (from sharedris.load_pretrained or "
                         "sharedris.build_model), which carries its config")
    cfg = model.config
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if model.training or any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu().eval()  # the caller's model stays where and as it was

    # Example inputs: batch 2 and padding in one row only, so neither the batch size nor the
    # padding pattern is baked into the graph.
    B, L = 2, cfg.text_len
    image = torch.zeros(B, 3, cfg.image_size, cfg.image_size)
    ids = torch.full((B, L), 5, dtype=torch.long)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, L // 2:] = True
    batch = torch.export.Dim("batch", min=1, max=4096)
    text_len = torch.export.Dim("text_len", min=2, max=cfg.encoder.max_text_positions - POSITION_OFFSET)
    dynamic = {"image": {0: batch}, "text_ids": {0: batch, 1: text_len}, "text_padding_mask": {0: batch, 1: text_len}}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    # the exporter's deprecation, axis-renaming and "torchvision is not installed" chatter
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (image, ids, pad), str(out), input_names=list(INPUT_NAMES),
                              output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic, opset_version=opset,
                              external_data=weight_bytes > _MAX_INLINE_BYTES, dynamo=True, verbose=False)
    finally:
        registry_log.setLevel(level)

    graph = onnx.load(str(out), load_external_data=False)
    entry = graph.metadata_props.add()
    entry.key, entry.value = "sharedris_config", json.dumps(cfg.to_dict())
    onnx.save(graph, str(out))
    return out
