"""The HTTP service: ``POST /v1/segment``, ``GET /v1/model``, ``GET /healthz`` and the demo page at ``/``.

The model is loaded once, when the app is created. Requests are decoded and encoded in parallel
(FastAPI's thread pool), but one request at a time runs the model: a lock keeps concurrent
requests from sharing torch's intra-op threads, which would make each slower, not the total faster.
Every error a client can cause comes back as ``{"error": "one sentence"}`` with a 4xx status.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sharedris.data.images import ImageError, load_image
from sharedris.data.synthetic import COLOURS, SHAPES
from sharedris.modeling.pretrained import load_pretrained
from sharedris.predictor import Predictor
from sharedris.render import encode_rle, overlay, unknown_words_line
from sharedris.text import validate_texts

FORMATS = ("json", "png", "overlay")
FORM_ALLOWANCE = 64 * 1024  # room for the text fields and multipart framing on top of the image
USAGE = "send multipart/form-data with an 'image' file and one or more 'text' fields"
MiB = 1024 * 1024
EXAMPLE_IMAGE = "example.png"  # a synthetic test scene, shipped in static/ for the demo page
EXAMPLE_TEXTS = ("the blue diamond", "all the red shapes", "the red circle")
DEFAULT_MODEL_DESCRIPTION = (
    "The default model is small and was trained only on synthetic scenes of coloured shapes (1 to 10 "
    "per picture, drawn in many styles), so it knows that world and nothing else (not photos). It knows "
    f"colours ({', '.join(COLOURS)}), shapes ({', '.join(SHAPES)}), sizes (small, big, large, the smallest, "
    "the biggest, the bigger of the two), positions (left, right, top, bottom, middle, the leftmost ...), "
    "relations to another object (the circle closest to / next to / farthest from the purple triangle; "
    "its weak spot) and groups (all the red shapes, both triangles), and answers \"no match\" when "
    "nothing in the image fits or when a colour, shape or size word is one it does not know. On its own "
    "test scenes: gIoU 0.82; on scenes from an independent renderer it never trained on: targets found "
    "93-100% of the time, mask mIoU 0.64-0.95 by kind of scene (docs/models.md)."
)


@dataclass(frozen=True)
class Limits:
    """What one request may contain.

    Args:
        max_upload_bytes: largest image file accepted (the request body may be
            ``FORM_ALLOWANCE`` larger for the texts).
        max_pixels: largest decoded image, width x height. Full-size masks cost about
            9 bytes per pixel per expression while they are computed, so this bounds memory.
        max_texts: most expressions in one request (they run as one batch).
        max_text_chars: longest expression, in characters.
    """

    max_upload_bytes: int = 20 * MiB
    max_pixels: int = 4096 * 4096
    max_texts: int = 16
    max_text_chars: int = 500

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_texts", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class RequestError(Exception):
    """A bad request: ``status`` and a one-sentence ``message`` for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _size_text(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n:,} bytes"


class BodyLimit:
    """Refuse request bodies above ``max_bytes`` with 413, before they are read in full.

    A declared Content-Length is checked up front; a chunked body is counted as it arrives, and
    whatever the app answers after the limit is passed is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, message: str) -> None:
        self.app, self.max_bytes, self.message = app, max_bytes, message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await _error(413, self.message, {"Connection": "close"})(scope, receive, send)
            return
        seen, exceeded, answered = 0, False, False

        async def counting_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise RequestError(413, self.message)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if exceeded:  # drop the app's answer to the half-read body; ours goes out below
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not answered:
            await _error(413, self.message, {"Connection": "close"})(scope, receive, send)


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header, without decoding pixels; None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:
                return probe.size
    except Exception:  # noqa: BLE001 - load_image reports any unreadable file in one sentence
        return None


def _check_texts(texts: list[str], limits: Limits) -> list[str]:
    if len(texts) > limits.max_texts:
        raise RequestError(400, f"got {len(texts)} expressions; this service takes at most "
                                f"{limits.max_texts} per request, so split them over several requests")
    try:
        return validate_texts(texts, max_chars=limits.max_text_chars)
    except ValueError as e:
        raise RequestError(400, str(e)) from None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _static(name: str) -> bytes:
    return (resources.files("sharedris.serve") / "static" / name).read_bytes()


def describe_model(model_dir: str | Path, image_size: int, trained_on: str | None = None,
                   vocabulary: frozenset[str] | None = None) -> dict[str, Any]:
    """What ``GET /v1/model`` says about the model in ``model_dir``: name, description, example.

    ``trained_on`` and ``vocabulary`` are the model's own record of its training data
    (``model.description`` and ``model.vocabulary``, from its ``vocabulary.json``); when it has
    them they are added as ``trained_on`` and ``vocabulary_size``.
    """
    name = Path(str(model_dir)).name
    if str(model_dir) == "default":
        description = DEFAULT_MODEL_DESCRIPTION
    elif trained_on:
        description = f"A checkpoint loaded from {name} ({image_size} px input), trained on {trained_on}."
    else:  # a checkpoint without vocabulary.json records its architecture, not what it was trained on
        description = (f"A checkpoint loaded from {name} ({image_size} px input); the "
                       "checkpoint does not record what it was trained on, so ask whoever trained it.")
    about: dict[str, Any] = {"name": name, "description": description}
    if trained_on:
        about["trained_on"] = trained_on
    if vocabulary is not None:
        about["vocabulary_size"] = len(vocabulary)
    return {**about, "example_image": f"/{EXAMPLE_IMAGE}", "example_texts": list(EXAMPLE_TEXTS)}


def create_app(model_dir: str | Path = "default", limits: Limits | None = None,
               device: str = "cpu", precision: str = "fp32", presence_threshold: float = 0.5,
               runtime: str = "torch") -> FastAPI:
    """The service for the model in ``model_dir`` (a checkpoint folder, or ``"default"``).

    The model is loaded here, once; a bad folder raises :class:`PretrainedError` before any
    request is served. ``presence_threshold`` is the :class:`Predictor`'s: below it an expression
    is "no match".
    """
    from sharedris import __version__

    limits = limits or Limits()
    predictor = Predictor(load_pretrained(model_dir, device=device), device=device, precision=precision,
                          presence_threshold=presence_threshold, runtime=runtime)
    logging.getLogger("uvicorn.error").info("sharedris: precision %s (runtime %s) on %s", predictor.precision,
                                            predictor.runtime, device)
    model_lock = threading.Lock()
    page, example = _static("index.html").decode("utf-8"), _static(EXAMPLE_IMAGE)
    about = describe_model(model_dir, predictor.config.image_size, predictor.description, predictor.vocabulary)

    app = FastAPI(title="sharedris", version=__version__,
                  description="Referring image segmentation: the mask of what a phrase refers to.")
    too_large = (f"the request is larger than {_size_text(limits.max_upload_bytes)}; "
                 "send a smaller image (downscale or recompress it)")
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes + FORM_ALLOWANCE, message=too_large)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first: dict[str, Any] = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ())]
        name = loc[-1] if loc else "request"
        if first.get("type") == "missing":
            return _error(422, f"the form field '{name}' is missing; {USAGE}")
        where = "query parameter" if loc[:1] == ["query"] else "form field"
        return _error(422, f"the {where} '{name}' is invalid ({first.get('msg', 'unexpected value')}); {USAGE}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = (f"{request.url.path} does not exist; the endpoints are GET /, GET /healthz, "
                       "GET /v1/model and POST /v1/segment")
        elif exc.status_code == 405:
            message = f"{request.url.path} does not accept {request.method}"
        elif exc.status_code == 400 and "parsing the body" in str(exc.detail):
            message = f"the request body could not be read; {USAGE}"
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(exc).__name__}); this is a bug, see the server log")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def demo() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get(f"/{EXAMPLE_IMAGE}", include_in_schema=False)
    def example_image() -> Response:
        return Response(example, media_type="image/png")

    @app.get("/favicon.svg", include_in_schema=False)
    def favicon() -> Response:
        return Response(_static("favicon.svg"), media_type="image/svg+xml")

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        """The loaded model: its name, what it knows, and an example image with phrases to try."""
        return about

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness, and which model answers."""
        cfg = predictor.config
        return {"status": "ok", "model": str(model_dir), "image_size": cfg.image_size,
                "text_len": cfg.text_len, "precision": predictor.precision, "runtime": predictor.runtime,
                "presence_threshold": predictor.presence_threshold,
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels,
                           "max_texts": limits.max_texts, "max_text_chars": limits.max_text_chars}}

    def run(data: bytes, texts: list[str], fmt: str) -> Response:
        """Decode, predict, encode: runs in a worker thread."""
        t0 = time.perf_counter()
        size = _image_size(data)
        if size is not None and size[0] * size[1] > limits.max_pixels:
            raise RequestError(413, f"the image is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels; "
                                    f"this service takes at most {limits.max_pixels:,}, so downscale it")
        try:
            image = load_image(data)
        except ImageError as e:
            raise RequestError(400, str(e)) from None
        t1 = time.perf_counter()
        with model_lock:
            pred = predictor.predict(image, texts)
        t2 = time.perf_counter()
        if fmt == "json":
            results = [{"text": t, "matched": bool(pred.matched[n]), "present": round(float(pred.present[n]), 4),
                        "score": round(float(pred.scores[n]), 4), "rle": encode_rle(pred.masks[n]),
                        "unknown_words": pred.unknown_words[n]} for n, t in enumerate(texts)]
            body: Any = {"width": image.width, "height": image.height, "results": results,
                         "warning": unknown_words_line(str(model_dir), predictor.description, pred.unknown_words)}
        elif fmt == "png":  # "no match": the mask is empty, an all-black PNG
            body = _png(Image.fromarray(pred.masks[0].astype(np.uint8) * 255))
        else:
            body = _png(overlay(image, pred.masks[0], texts[0], score=float(pred.scores[0]),
                                present=float(pred.present[0]), matched=bool(pred.matched[0])))
        t3 = time.perf_counter()
        timings = {"decode": (t1 - t0) * 1000, "inference": (t2 - t1) * 1000, "encode": (t3 - t2) * 1000}
        headers = {"Server-Timing": ", ".join(f"{k};dur={v:.1f}" for k, v in timings.items())}
        if fmt == "json":
            body["timings_ms"] = {k: round(v, 1) for k, v in timings.items()}
            return JSONResponse(body, headers=headers)
        headers["X-Sharedris-Score"] = f"{float(pred.scores[0]):.4f}"
        headers["X-Sharedris-Present"] = f"{float(pred.present[0]):.4f}"
        headers["X-Sharedris-Matched"] = "true" if pred.matched[0] else "false"
        return Response(body, media_type="image/png", headers=headers)

    @app.post("/v1/segment", responses={400: {"description": "bad input"}, 413: {"description": "too large"}})
    async def segment(image: UploadFile = File(..., description="the image (any format Pillow reads)"),
                      text: list[str] = Form(..., description="an expression; repeat the field for more"),
                      format: str = Query("json", description="json (COCO RLE masks), png (binary mask) "
                                                              "or overlay (tinted PNG); png and overlay "
                                                              "take exactly one expression")) -> Response:
        """Segment what each expression refers to in the image.

        An expression that matches nothing (``matched`` false) has an empty mask: an empty RLE, an
        all-black PNG, or the plain image captioned "no match".
        """
        if format not in FORMATS:
            raise RequestError(400, f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        texts = _check_texts(text, limits)
        if format != "json" and len(texts) != 1:
            raise RequestError(400, f"format={format} returns one image, so send exactly one expression "
                                    f"(got {len(texts)}); use format=json for several")
        data = await image.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise RequestError(413, f"the image is larger than {_size_text(limits.max_upload_bytes)}; "
                                    "send a smaller image (downscale or recompress it)")
        return await run_in_threadpool(run, data, texts, format)

    return app
