"""The HTTP service: ``POST /v1/segment``, ``GET /v1/model``, ``GET /healthz``, the demo page at ``/``
and the API's interactive documentation at ``/docs``.

The model is loaded once, when the app is created. Requests are decoded and encoded in parallel
(FastAPI's thread pool); the model runs in a thread of its own, the :class:`Batcher`, which puts the
expressions of all the requests waiting for it through one forward pass. One pass at a time:
concurrent passes would share torch's intra-op threads, which would make each slower, not the
total faster. With an API key (:class:`ApiKeyAuth`) every route but ``/healthz`` needs it.
Every error a client can cause comes back as ``{"error": "one sentence"}`` with a 4xx status.

The documentation pages (Swagger UI at ``/docs``, ReDoc at ``/redoc``) load their scripts and
styles from the service itself, so they work without internet: the files come from the
``fastapi-offline`` package (MIT; it ships current Swagger UI and ReDoc builds and is updated as
they are, unlike ``swagger-ui-bundle``, whose last release carries Swagger UI 4).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
import re
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import Tensor

from sharedris.data.images import ImageError, load_image
from sharedris.modeling.pretrained import load_pretrained
from sharedris.modeling.segmenter import SegmenterOutput
from sharedris.predictor import Predictor
from sharedris.render import answer_record, overlay, unknown_words_line
from sharedris.runtime import DEFAULT_DEVICE, DEFAULT_PRECISION, DEFAULT_PRESENCE_THRESHOLD, DEFAULT_RUNTIME
from sharedris.text import validate_texts

FORMATS = ("json", "png", "overlay")
FORM_ALLOWANCE = 64 * 1024  # room for the text fields and multipart framing on top of the image
USAGE = "send multipart/form-data with an 'image' file and one or more 'text' fields"
MiB = 1024 * 1024
EXAMPLE_IMAGE = "example.png"  # a synthetic test scene, shipped in static/ for the demo page
EXAMPLE_TEXTS = ("the blue diamond", "all the red shapes", "the red circle")
DEFAULT_MODEL_DESCRIPTION = (
    "The default model is small and was trained only on synthetic scenes of coloured shapes (1 to 10 "
    "per picture, drawn in many styles: trained_on says which), so it knows that world and nothing else "
    "(not photos). It knows the six colours and six shapes of trained_on, sizes (small, big, large, the smallest, "
    "the biggest, the bigger of the two), positions (left, right, top, bottom, middle, the leftmost ...), "
    "relations to another object (the circle closest to / next to / farthest from the purple triangle; "
    "its weak spot) and groups (all the red shapes, both triangles), and answers \"no match\" when "
    "nothing in the image fits or when a colour, shape or size word is one it does not know. On its own "
    "test scenes: gIoU 0.90; on scenes from an independent renderer it never trained on: targets found "
    "97-100% of the time, gIoU 0.84-0.97 by kind of scene (docs/models.md)."
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


@dataclass(frozen=True)
class Batching:
    """How the model thread gathers the requests waiting for it into one forward pass.

    Args:
        wait_ms: how long the first request to wait for the model waits for others to join it
            (0: take only those already waiting). Requests that arrive while the model is busy
            wait anyway, and go in the next pass together.
        max_batch: most expressions in one forward pass. A request is never split, so one with
            more expressions than this runs alone; 1 runs one request at a time.
    """

    wait_ms: float = 5.0
    max_batch: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.wait_ms <= 10_000:
            raise ValueError(f"the batch wait must be from 0 to 10000 ms, got {self.wait_ms}")
        if self.max_batch < 1:
            raise ValueError(f"the largest batch must be at least 1 expression, got {self.max_batch}")


@dataclass
class _Waiting:
    """One request's pairs waiting for the model, and where their output goes."""

    images: Tensor  # (P, 3, S, S)
    ids: Tensor  # (P, L)
    pad: Tensor  # (P, L)
    arrived: float  # time.monotonic()
    output: Future[SegmenterOutput] = field(default_factory=Future)


class Batcher:
    """Runs ``predictor.forward`` in a thread of its own, on the pairs of every request waiting.

    :meth:`run` is called from the requests' threads and blocks until its pairs have been through
    the model. The model thread takes the waiting requests in arrival order, up to
    ``batching.max_batch`` pairs, puts them through one :meth:`Predictor.forward` and hands each
    request its rows of the output; post-processing stays in the requests' threads. If a pass of
    several requests fails, each is run again alone, so a request that fails fails only itself.
    The thread starts with the first request and ends at :meth:`close`.
    """

    def __init__(self, predictor: Predictor, batching: Batching) -> None:
        self.predictor, self.batching = predictor, batching
        self.forward_passes = self.pairs_run = 0  # so far; their ratio is the mean batch size
        self._waiting: deque[_Waiting] = deque()
        self._waiting_pairs = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    def run(self, images: Tensor, ids: Tensor, pad: Tensor) -> SegmenterOutput:
        """The model's output for one request's pairs: images (P, 3, S, S), ids and pad (P, L)."""
        job = _Waiting(images, ids, pad, time.monotonic())
        with self._changed:
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(target=self._loop, name="sharedris-model", daemon=True)
                self._thread.start()
            self._waiting.append(job)
            self._waiting_pairs += len(ids)
            self._changed.notify()
        return job.output.result()

    def close(self) -> None:
        """Stop the model thread once the requests already waiting have run."""
        with self._changed:
            thread, self._closing = self._thread, True
            self._changed.notify()
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while jobs := self._next_batch():
            self._forward(jobs)

    def _next_batch(self) -> list[_Waiting]:
        """The requests of the next pass: wait for one, then until ``wait_ms`` after it arrived or
        until ``max_batch`` pairs wait. Empty, and the thread is done, once closing with none waiting."""
        limit = self.batching.max_batch
        with self._changed:
            while not self._waiting and not self._closing:
                self._changed.wait()
            if not self._waiting:
                self._thread = None  # decided under the lock: a later run() starts a new thread
                return []
            deadline = self._waiting[0].arrived + self.batching.wait_ms / 1000
            while self._waiting_pairs < limit and not self._closing and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            jobs, pairs = [], 0
            while self._waiting and (not jobs or pairs + len(self._waiting[0].ids) <= limit):
                jobs.append(self._waiting.popleft())
                pairs += len(jobs[-1].ids)
            self._waiting_pairs -= pairs
            return jobs

    def _forward(self, jobs: list[_Waiting]) -> None:
        try:
            output = self.predictor.forward(torch.cat([j.images for j in jobs]), torch.cat([j.ids for j in jobs]),
                                            torch.cat([j.pad for j in jobs]))
        except Exception as e:  # noqa: BLE001 - the request's own thread raises it
            if len(jobs) == 1:
                jobs[0].output.set_exception(e)
            else:  # each alone: only a request that fails by itself gets an error
                for job in jobs:
                    self._forward([job])
            return
        self.forward_passes += 1
        start = 0
        for job in jobs:
            job.output.set_result(output.rows(start, start + len(job.ids)))
            start += len(job.ids)
        self.pairs_run += start


API_KEY_USAGE = ("send it as 'Authorization: Bearer KEY' (a browser asks for it: any user name, "
                 "the key as the password)")


class ApiKeyAuth:
    """Refuse, with 401, every request that does not carry ``key``, except those to ``/healthz``.

    Programs send ``Authorization: Bearer KEY``. Browsers use HTTP Basic authentication: the 401
    asks for a user name (any) and a password (the key), and the browser then sends them with
    every request to the service, those of the demo page and of /docs included. The key is
    compared in constant time (digests compared with :func:`hmac.compare_digest`) and never logged.
    """

    OPEN_PATHS = frozenset({"/healthz"})

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self._digest = app, hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = _presented_key(dict(scope["headers"]).get(b"authorization"))
        if given is not None and hmac.compare_digest(hashlib.sha256(given).digest(), self._digest):
            await self.app(scope, receive, send)
            return
        message = (f"this service needs its API key; {API_KEY_USAGE}" if given is None
                   else f"the API key is wrong or not sent as the service expects; {API_KEY_USAGE}")
        challenge = {"WWW-Authenticate": 'Basic realm="sharedris", charset="UTF-8"'}
        await _error(401, message, challenge)(scope, receive, send)


def _presented_key(header: bytes | None) -> bytes | None:
    """The key in an Authorization header (Bearer, or a Basic password); None without the header,
    and b"" for a header that carries none."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() == b"bearer":
        return value.strip()
    if scheme.lower() == b"basic":
        try:
            return base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except ValueError:  # binascii.Error: not base64
            return b""
    return b""


def check_api_key(key: str) -> None:
    """Raise ValueError unless ``key`` can be sent in an HTTP header; the error names the rule, never the key."""
    if not re.fullmatch(r"[!-~]+", key):
        raise ValueError("the API key must be one or more visible ASCII characters (letters, digits, "
                         "punctuation; no spaces)")


class SegmentService:
    """The model behind the routes: decode a request, put it through the :class:`Batcher`, encode the answer."""

    def __init__(self, model_dir: str | Path, predictor: Predictor, limits: Limits, batching: Batching,
                 api_key_required: bool = False) -> None:
        self.model_name, self.predictor, self.limits = str(model_dir), predictor, limits
        self.batcher, self.api_key_required = Batcher(predictor, batching), api_key_required

    def health(self) -> dict[str, Any]:
        """What ``GET /healthz`` says: liveness, which model answers, the limits, the batching settings and
        how many forward passes ran how many expressions so far."""
        cfg, p, limits, batching = self.predictor.config, self.predictor, self.limits, self.batcher.batching
        return {"status": "ok", "model": self.model_name, "image_size": cfg.image_size, "text_len": cfg.text_len,
                "precision": p.precision, "runtime": p.runtime, "presence_threshold": p.presence_threshold,
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels,
                           "max_texts": limits.max_texts, "max_text_chars": limits.max_text_chars},
                "batching": {"wait_ms": batching.wait_ms, "max_batch": batching.max_batch,
                             "forward_passes": self.batcher.forward_passes, "expressions": self.batcher.pairs_run},
                "api_key_required": self.api_key_required}

    def segment(self, data: bytes, texts: list[str], fmt: str) -> Response:
        """Decode, predict, encode: runs in a worker thread; ``texts`` are already checked."""
        t0 = time.perf_counter()
        image = self._decode(data)
        x, (height, width) = self.predictor.preprocess_image(image)
        ids, pad = self.predictor.prepare_texts(texts)
        t1 = time.perf_counter()
        output = self.batcher.run(x[None].expand(len(ids), -1, -1, -1), ids, pad)
        pred = self.predictor.postprocess(output, height, width, texts=texts)
        t2 = time.perf_counter()
        if fmt == "json":
            results = [answer_record(t, pred, n) for n, t in enumerate(texts)]
            body: Any = {"width": image.width, "height": image.height, "results": results,
                         "warning": unknown_words_line(self.model_name, self.predictor.description,
                                                       pred.unknown_words)}
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

    def _decode(self, data: bytes) -> Image.Image:
        size = _image_size(data)
        if size is not None and size[0] * size[1] > self.limits.max_pixels:
            raise RequestError(413, f"the image is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels; this "
                                    f"service takes at most {self.limits.max_pixels:,}, so downscale it")
        try:
            return load_image(data)
        except ImageError as e:
            raise RequestError(400, str(e)) from None


def create_app(model_dir: str | Path = "default", limits: Limits | None = None,
               device: str = DEFAULT_DEVICE, precision: str = DEFAULT_PRECISION,
               presence_threshold: float = DEFAULT_PRESENCE_THRESHOLD, runtime: str = DEFAULT_RUNTIME,
               batching: Batching | None = None, api_key: str | None = None) -> FastAPI:
    """The service for the model in ``model_dir`` (a checkpoint folder, or ``"default"``).

    The model is loaded here, once; a bad folder raises :class:`PretrainedError` before any
    request is served. ``presence_threshold`` is the :class:`Predictor`'s: below it an expression
    is "no match". ``batching``: how concurrent requests share forward passes (:class:`Batching`).
    With ``api_key`` every route but ``/healthz`` needs that key (:class:`ApiKeyAuth`).
    """
    from sharedris import __version__

    limits, batching = limits or Limits(), batching or Batching()
    if api_key is not None:
        check_api_key(api_key)
    predictor = Predictor(load_pretrained(model_dir, device=device), device=device, precision=precision,
                          presence_threshold=presence_threshold, runtime=runtime)
    service = SegmentService(model_dir, predictor, limits, batching, api_key_required=api_key is not None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logging.getLogger("uvicorn.error").info(  # at startup, once uvicorn's logging is set up
            "sharedris: precision %s (runtime %s) on %s; batches of up to %d expressions, %g ms wait; %s",
            predictor.precision, predictor.runtime, device, batching.max_batch, batching.wait_ms,
            "every route but /healthz needs the API key" if api_key is not None else "no API key")
        yield
        await run_in_threadpool(service.batcher.close)

    app = FastAPIOffline(title="sharedris", version=__version__, lifespan=lifespan,
                         description="Referring image segmentation: the mask of what a phrase refers to.")
    app.state.service = service
    too_large = (f"the request is larger than {_size_text(limits.max_upload_bytes)}; "
                 "send a smaller image (downscale or recompress it)")
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes + FORM_ALLOWANCE, message=too_large)
    if api_key is not None:  # added last, so it runs first: no body is read without the key
        app.add_middleware(ApiKeyAuth, key=api_key)
    _add_error_handlers(app)
    _add_routes(app, service, describe_model(model_dir, predictor.config.image_size, predictor.description,
                                             predictor.vocabulary))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": "one sentence"}``."""

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
            message = (f"{request.url.path} does not exist; the endpoints are GET /, GET /docs, GET /healthz, "
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


def _add_routes(app: FastAPI, service: SegmentService, about: dict[str, Any]) -> None:
    """The demo page, its example image and the API; each route hands its work to ``service``."""
    page, example, limits = _static("index.html").decode("utf-8"), _static(EXAMPLE_IMAGE), service.limits

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
        """Liveness, and which model answers (the one route that needs no API key)."""
        return service.health()

    @app.post("/v1/segment", responses={400: {"description": "bad input"}, 413: {"description": "too large"}})
    async def segment(image: UploadFile = File(..., description="the image (any format Pillow reads)"),
                      text: list[str] = Form(..., description="an expression; repeat the field for more"),
                      format: str = Query("json", description="json (COCO RLE masks), png (binary mask) or "
                                                              "overlay (PNG: the mask outlined, the rest dimmed); "
                                                              "png and overlay take exactly one expression")) -> Response:
        """Segment what each expression refers to in the image.

        An expression that matches nothing (``matched`` false) has an empty mask: an empty RLE, an
        all-black PNG, or the picture greyed under a "no match" label.
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
        return await run_in_threadpool(service.segment, data, texts, format)
