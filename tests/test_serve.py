"""The HTTP service: results equal the Predictor's, every bad request is a 4xx JSON sentence, and
the service keeps serving afterwards. An expression that matches nothing comes back as "no match"
(an empty mask), and words the model does not know are named in a warning. Concurrent requests
share forward passes and get the answers they get one by one; with an API key every route but
/healthz needs it, and the key is never logged."""

from __future__ import annotations

import base64
import io
import logging
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from _tiny_model import encode, save_tiny_model, scene
from fastapi.testclient import TestClient  # the dev extra; a missing install fails rather than skips
from PIL import Image
from pycocotools import mask as mask_utils
from starlette.routing import Mount

from sharedris.modeling.pretrained import load_pretrained
from sharedris.render import overlay
from sharedris.serve.app import FORM_ALLOWANCE, Batching, Limits, create_app

LIMITS = Limits(max_upload_bytes=200_000, max_pixels=1_000_000, max_texts=4, max_text_chars=500)


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(model_dir, limits=LIMITS, precision="fp32")) as c:  # as the predictor fixture
        yield c


@pytest.fixture(scope="module")
def no_match_dir(tmp_path_factory):
    """A tiny model that finds no expression present (presence 0) and knows only "the", "red", "box"."""
    return save_tiny_model(tmp_path_factory.mktemp("no_match") / "nomatch", presence_bias=-20.0,
                           vocabulary=["the", "red", "box"], description="synthetic shape scenes")


@pytest.fixture(scope="module")
def no_match_client(no_match_dir):
    with TestClient(create_app(no_match_dir, limits=LIMITS)) as c:
        yield c


def _post(client, image: bytes | None, texts, fmt: str | None = None, filename: str = "photo.png"):
    files = {"image": (filename, image, "application/octet-stream")} if image is not None else None
    data = {"text": texts} if texts is not None else None
    params = {"format": fmt} if fmt else None
    return client.post("/v1/segment", files=files, data=data, params=params)


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def _assert_still_serving(client) -> None:
    r = _post(client, encode(scene(20, 16, seed=9)), ["the red box"])
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (20, 16)


def _assert_error(r, status: int, *needles: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and "\n" not in body["error"]
    for needle in needles:
        assert needle in body["error"]
    return body["error"]


def test_healthz(client, model_dir):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["model"] == str(model_dir)
    assert r.json()["presence_threshold"] == 0.5
    # which runtime answers, beside the precision: the default, auto, picks OpenVINO on a CPU where it is
    # installed (the dev extra installs it)
    assert r.json()["runtime"] == "openvino"


def test_demo_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element_id in ('id="image"', 'id="texts"', 'id="segment"', 'id="example"', 'id="model"', '"/v1/segment"',
                       '"/v1/model"'):
        assert element_id in r.text


def test_model_endpoint_describes_the_model_and_its_example(client, model_dir):
    about = client.get("/v1/model").json()
    assert about["name"] == model_dir.name and str(model_dir.name) in about["description"]
    assert "vocabulary_size" not in about and "trained_on" not in about  # no vocabulary.json
    example = client.get(about["example_image"])
    assert example.status_code == 200 and example.headers["content-type"] == "image/png"
    r = _post(client, example.content, about["example_texts"])
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == len(about["example_texts"])


def test_model_endpoint_gives_the_vocabulary_size_and_what_it_was_trained_on(no_match_client):
    about = no_match_client.get("/v1/model").json()
    assert (about["vocabulary_size"], about["trained_on"]) == (3, "synthetic shape scenes")
    assert "nomatch" in about["description"] and "trained on synthetic shape scenes" in about["description"]


def test_the_default_model_says_it_knows_only_synthetic_shapes():
    from sharedris.data.synthetic import COLOURS, SHAPES
    from sharedris.serve.app import describe_model

    model = load_pretrained("default")
    about = describe_model("default", 128, model.description, model.vocabulary)
    assert about["name"] == "default" and "synthetic" in about["description"]
    said = about["description"] + " " + about["trained_on"]  # what GET /v1/model tells a user
    for word in [*COLOURS, *SHAPES, "small", "left", "closest to"]:
        assert word in said, word


def test_segment_returns_rle_masks_equal_to_the_predictor(client, predictor):
    img = scene(40, 30, seed=1)
    texts = ["the red box", "a blue square on the left"]
    r = _post(client, encode(img), texts)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (40, 30)
    assert set(body["timings_ms"]) == {"decode", "inference", "encode"}
    expected = predictor.predict(img, texts)
    assert [res["text"] for res in body["results"]] == texts
    assert body["warning"] is None  # an open vocabulary: no word is unknown
    for n, res in enumerate(body["results"]):
        assert set(res) == {"text", "matched", "present", "score", "rle", "bbox", "unknown_words"}
        assert res["rle"]["size"] == [30, 40]
        np.testing.assert_array_equal(_decode(res["rle"]), expected.masks[n])
        assert res["score"] == pytest.approx(float(expected.scores[n]), abs=1e-4)
        assert res["present"] == pytest.approx(float(expected.present[n]), abs=1e-4)
        assert (res["matched"], res["unknown_words"]) == (bool(expected.matched[n]), [])


def test_png_and_overlay_formats(client, predictor):
    img = scene(33, 21, seed=2)
    r = _post(client, encode(img), ["the red box"], fmt="png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert mask.shape == (21, 33) and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask > 127, predictor.predict(img, "the red box").masks[0])
    assert float(r.headers["X-Sharedris-Score"]) >= 0
    r = _post(client, encode(img), ["the red box"], fmt="overlay")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    shown = Image.open(io.BytesIO(r.content))
    assert shown.width == 33 and shown.height > 21  # the caption bar sits above the image
    score, present = float(r.headers["X-Sharedris-Score"]), float(r.headers["X-Sharedris-Present"])
    expected = overlay(img, mask > 127, "the red box", score=score, present=present,
                       matched=r.headers["X-Sharedris-Matched"] == "true")
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(expected))


def test_no_match_json_says_so_and_names_unknown_words(no_match_client):
    texts = ["the red box", "the cat", "a dog next to the cat"]
    r = _post(no_match_client, encode(scene(40, 30, seed=1)), texts)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["warning"] == ("the model nomatch was trained on synthetic shape scenes and does not know: "
                               "cat, a, dog, next, to")
    assert [res["unknown_words"] for res in body["results"]] == [[], ["cat"], ["a", "dog", "next", "to", "cat"]]
    for res in body["results"]:
        assert (res["matched"], res["score"]) == (False, 0.0) and 0 <= res["present"] < 0.01
        assert not _decode(res["rle"]).any()


def test_no_match_png_is_black_and_overlay_says_no_match(no_match_client):
    img = scene(33, 21, seed=2)
    r = _post(no_match_client, encode(img), ["the red box"], fmt="png")
    assert r.status_code == 200 and r.headers["X-Sharedris-Matched"] == "false"
    assert float(r.headers["X-Sharedris-Present"]) < 0.01
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert mask.shape == (21, 33) and not mask.any()
    r = _post(no_match_client, encode(img), ["the red box"], fmt="overlay")
    assert r.status_code == 200 and r.headers["X-Sharedris-Matched"] == "false"
    shown = np.asarray(Image.open(io.BytesIO(r.content)))
    present = float(r.headers["X-Sharedris-Present"])
    expected = overlay(img, np.zeros((21, 33), dtype=bool), "the red box", present=present, matched=False)
    np.testing.assert_array_equal(shown, np.asarray(expected))
    _assert_error(_post(no_match_client, encode(img), ["a", "b"], fmt="overlay"), 400, "exactly one expression")


def test_present_with_an_empty_mask_is_no_match_scored_0(empty_mask_model_dir):
    img = scene(24, 18, seed=3)
    with TestClient(create_app(empty_mask_model_dir, limits=LIMITS)) as c:
        (res,) = _post(c, encode(img), ["the red box"]).json()["results"]
        png, shown = (_post(c, encode(img), ["the red box"], fmt=fmt) for fmt in ("png", "overlay"))
    assert (res["matched"], res["score"]) == (False, 0.0) and res["present"] > 0.99 and not _decode(res["rle"]).any()
    for r in (png, shown):
        assert (r.headers["X-Sharedris-Matched"], r.headers["X-Sharedris-Score"]) == ("false", "0.0000")
    assert not np.asarray(Image.open(io.BytesIO(png.content))).any()
    expected = overlay(img, np.zeros((18, 24), dtype=bool), "the red box", present=res["present"], matched=False)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(shown.content))), np.asarray(expected))


def test_presence_threshold_is_the_services(no_match_dir):
    with TestClient(create_app(no_match_dir, limits=LIMITS, presence_threshold=0.0)) as c:
        (res,) = _post(c, encode(scene(24, 18, seed=3)), ["the red box"]).json()["results"]
    assert res["matched"] is True and res["present"] < 0.01
    with pytest.raises(ValueError, match="presence_threshold"):
        create_app(no_match_dir, presence_threshold=1.5)


def _chunked_multipart(image: bytes, text: str):
    """A multipart body sent without Content-Length, so the limit must be enforced while reading."""
    boundary = "sharedris-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n{text}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        yield head
        for i in range(0, len(image), 16384):
            yield image[i:i + 16384]
        yield tail

    return chunks(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize("case", ["too_many_texts", "text_too_long", "empty_text", "blank_text", "upload_too_big",
                                  "chunked_upload_too_big", "too_many_pixels", "two_texts_as_png", "bad_format",
                                  "missing_image", "missing_text", "image_as_plain_field", "not_multipart"])
def test_limits_and_bad_requests_are_4xx_json_and_the_service_keeps_serving(client, case):
    good = encode(scene(24, 18, seed=3))
    if case == "too_many_texts":
        _assert_error(_post(client, good, ["a"] * 5), 400, "5 expressions", "at most 4")
    elif case == "text_too_long":
        _assert_error(_post(client, good, ["ok", "x" * 501]), 400, "expression 2", "501 characters", "limit is 500")
    elif case == "empty_text":
        _assert_error(_post(client, good, [""]), 400, "expression 1 is empty")
    elif case == "blank_text":
        _assert_error(_post(client, good, ["the box", "   "]), 400, "expression 2 is empty")
    elif case == "upload_too_big":
        big = np.random.default_rng(0).integers(0, 256, LIMITS.max_upload_bytes + FORM_ALLOWANCE, dtype=np.uint8)
        _assert_error(_post(client, big.tobytes(), ["a"]), 413, "larger than")
    elif case == "chunked_upload_too_big":
        big = np.random.default_rng(0).integers(0, 256, LIMITS.max_upload_bytes + FORM_ALLOWANCE, dtype=np.uint8)
        content, headers = _chunked_multipart(big.tobytes(), "the box")
        _assert_error(client.post("/v1/segment", content=content, headers=headers), 413, "larger than")
    elif case == "too_many_pixels":
        _assert_error(_post(client, encode(Image.new("RGB", (1100, 1000))), ["a"]), 413,
                      "1100x1000", "at most 1,000,000")
    elif case == "two_texts_as_png":
        _assert_error(_post(client, good, ["a", "b"], fmt="png"), 400, "exactly one expression")
    elif case == "bad_format":
        _assert_error(_post(client, good, ["a"], fmt="jpeg"), 400, "format must be one of")
    elif case == "missing_image":
        _assert_error(_post(client, None, ["a"]), 422, "'image' is missing")
    elif case == "missing_text":
        _assert_error(_post(client, good, None), 422, "'text' is missing")
    elif case == "image_as_plain_field":
        _assert_error(client.post("/v1/segment", data={"image": "not a file", "text": "a"}), 422, "'image'")
    elif case == "not_multipart":
        _assert_error(client.post("/v1/segment", json={"image": "x", "text": ["a"]}), 422, "missing")
    _assert_still_serving(client)


def test_unknown_path_and_method_are_json(client):
    _assert_error(client.get("/v2/segment"), 404, "does not exist", "GET /,", "GET /docs,", "GET /healthz,",
                  "GET /v1/model", "POST /v1/segment")
    _assert_error(client.get("/v1/segment"), 405, "does not accept GET")


@pytest.mark.parametrize("case", ["corrupt", "zero_byte", "text_file", "bomb", "bomb_warning_range"])
def test_bad_images_are_400_with_the_loader_sentence(client, monkeypatch, case):
    png = encode(scene(30, 20, seed=4))
    if case == "corrupt":
        data, needle = png[: len(png) // 2], "corrupt or truncated"
    elif case == "zero_byte":
        data, needle = b"", "is empty (0 bytes)"
    elif case == "text_file":
        data, needle = b"just some text, not an image\n" * 10, "not an image file"
    else:
        # Pillow reads its limit at call time, so a lowered limit makes a small PNG a "bomb":
        # above 2x the limit Pillow raises at open, between 1x and 2x it only warns (we refuse both).
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
        data = encode(Image.new("RGB", (200, 200) if case == "bomb" else (150, 100)))
        needle = "decompression bomb"
    _assert_error(_post(client, data, ["the box"]), 400, needle)
    monkeypatch.undo()
    _assert_still_serving(client)


@pytest.mark.parametrize("size", [(1, 1), (2000, 3), (3, 700)])
def test_tiny_and_extreme_aspect_images_work(client, predictor, size):
    img = scene(*size, seed=5)
    r = _post(client, encode(img), ["the box"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == size
    mask = _decode(body["results"][0]["rle"])
    assert mask.shape == (size[1], size[0])
    np.testing.assert_array_equal(mask, predictor.predict(img, "the box").masks[0])


def test_emoji_and_cjk_text_work(client):
    texts = ["the 🐱 on the left 👈", "左边的红色盒子", "the café's naïve sign"]
    r = _post(client, encode(scene(32, 32, seed=6)), texts)
    assert r.status_code == 200, r.text
    assert [res["text"] for res in r.json()["results"]] == texts


def test_ten_thousand_character_text_is_refused(client):
    _assert_error(_post(client, encode(scene(16, 16)), ["word " * 2000]), 400, "10,000 characters")
    _assert_still_serving(client)


def test_parallel_clients_get_the_sequential_results(client, predictor):
    jobs = [(scene(20 + 3 * i, 30 - 2 * i, seed=10 + i), [f"box number {i}", "the left one"][: 1 + i % 2])
            for i in range(8)]
    expected = [predictor.predict(img, texts).masks for img, texts in jobs]

    def call(job):
        img, texts = job
        return _post(client, encode(img), texts)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(call, jobs))
    for (img, texts), r, masks in zip(jobs, responses, expected):
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["width"], body["height"]) == img.size
        assert [res["text"] for res in body["results"]] == texts
        for res, mask in zip(body["results"], masks):
            np.testing.assert_array_equal(_decode(res["rle"]), mask)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_texts"):
        Limits(max_texts=0)


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch, capsys):
    from sharedris.cli import main

    for name in ("fastapi", "uvicorn", "sharedris.serve.app"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "default"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "sharedris serve: error: install the serve extra: pip install 'sharedris[serve]'"


def test_exif_orientation_is_applied(client):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x24, displayed rotated: 24 wide, 40 high
    r = _post(client, encode(scene(40, 24), "JPEG", exif=exif.tobytes()), ["the box"], filename="photo.jpg")
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (24, 40)
    assert r.json()["results"][0]["rle"]["size"] == [40, 24]


# ------------------------------------------------------------------------------------- offline docs
def test_docs_pages_load_their_files_from_the_service(client):
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", r.text)
        assert any(u.endswith(".js") for u in urls), urls  # the page's scripts were found ...
        for url in urls:  # ... and every file it names is the service's own
            assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
            assert client.get(url).status_code == 200, url


# ------------------------------------------------------------------------------------- batching
def _jobs() -> list[tuple[bytes, list[str], str]]:
    """Requests of different sizes and expression counts, one of them for a PNG mask."""
    jobs = []
    for i in range(6):
        texts = [f"box number {i}", "the left one", "top"][: 1 + i % 3]
        jobs.append((encode(scene(20 + 3 * i, 30 - 2 * i, seed=20 + i)), texts, "json"))
    return jobs + [(encode(scene(25, 17, seed=40)), ["the red box"], "png")]


def _answer(r) -> tuple[int, object, dict[str, str]]:
    """Status, body (JSON without the timings, or PNG bytes) and the X-Sharedris headers of an answer."""
    if r.headers["content-type"] == "image/png":
        body: object = r.content
    else:
        body = r.json()
        body.pop("timings_ms", None)
    return r.status_code, body, {k: v for k, v in r.headers.items() if k.startswith("x-sharedris")}


def _assert_same_answer(got, expected) -> None:
    """Equal, masks to the byte. Batching changes float32 sums in their last bits (the default model's
    logits by at most 2e-5), so a score or presence rounded to 4 decimals may differ by one unit there."""
    (status, body, headers), (status_e, body_e, headers_e) = got, expected
    assert status == status_e == 200
    assert headers.keys() == headers_e.keys()
    assert headers.get("x-sharedris-matched") == headers_e.get("x-sharedris-matched")
    for name in ("x-sharedris-score", "x-sharedris-present") if headers else ():
        assert float(headers[name]) == pytest.approx(float(headers_e[name]), abs=1.5e-4)
    if isinstance(body, bytes):
        assert body == body_e
        return
    def exact(answer: dict) -> dict:  # all but the scores and presences
        return {**answer, "results": [{k: v for k, v in res.items() if k not in ("score", "present")}
                                      for res in answer["results"]]}

    assert exact(body) == exact(body_e)  # texts, RLE masks, matched, unknown words, size, warning
    for res, res_e in zip(body["results"], body_e["results"]):
        assert (res["score"], res["present"]) == pytest.approx((res_e["score"], res_e["present"]), abs=1.5e-4)


@pytest.fixture(scope="module")
def one_by_one(model_dir):
    """The answers to ``_jobs()`` from a service that runs one request at a time, sent one after another."""
    app = create_app(model_dir, limits=LIMITS, batching=Batching(wait_ms=0, max_batch=1), precision="fp32")
    with TestClient(app) as c:
        answers = [_answer(_post(c, image, texts, fmt)) for image, texts, fmt in _jobs()]
    assert app.state.service.batcher.forward_passes == len(answers)
    return answers


def _concurrently(client, jobs) -> list:
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: _post(client, *job), jobs))


def _record_passes(app, monkeypatch, fail_on: str | None = None) -> list[int]:
    """The number of expressions of each forward pass the app runs from now on; with ``fail_on``,
    a pass that includes that expression raises."""
    predictor, passes = app.state.service.predictor, []
    forward, poison = predictor.forward, predictor.prepare_texts([fail_on])[0] if fail_on else None

    def recording_forward(images, ids, pad):
        passes.append(len(ids))
        if poison is not None and (ids == poison).all(1).any():
            raise RuntimeError("this pass fails")
        return forward(images, ids, pad)

    monkeypatch.setattr(predictor, "forward", recording_forward)
    return passes


def test_concurrent_requests_share_one_forward_pass_and_get_the_one_by_one_answers(model_dir, one_by_one):
    jobs = _jobs()
    pairs = sum(len(texts) for _, texts, _ in jobs)
    # a long wait, ended as soon as max_batch expressions wait: all the requests go in one pass
    app = create_app(model_dir, limits=LIMITS, batching=Batching(wait_ms=10_000, max_batch=pairs), precision="fp32")
    with TestClient(app) as c:
        responses = _concurrently(c, jobs)
    assert (app.state.service.batcher.forward_passes, app.state.service.batcher.pairs_run) == (1, pairs)
    for r, expected in zip(responses, one_by_one):
        _assert_same_answer(_answer(r), expected)


def test_a_pass_takes_at_most_max_batch_expressions_and_never_splits_a_request(model_dir, monkeypatch):
    app = create_app(model_dir, limits=LIMITS, batching=Batching(wait_ms=10_000, max_batch=2))
    passes = _record_passes(app, monkeypatch)
    with TestClient(app) as c:
        image = encode(scene(24, 18, seed=3))
        assert [r.status_code for r in _concurrently(c, [(image, ["the box"])] * 4)] == [200] * 4
        assert passes == [2, 2]
        r = _post(c, image, ["a", "b", "c"])  # more expressions than max_batch: one pass of its own
        assert r.status_code == 200 and len(r.json()["results"]) == 3
    assert passes == [2, 2, 3]


def test_a_failing_request_fails_alone_and_bad_requests_never_reach_the_batch(model_dir, monkeypatch, one_by_one):
    good = _jobs()[:3]
    pairs = sum(len(texts) for _, texts, _ in good) + 1
    app = create_app(model_dir, limits=LIMITS, batching=Batching(wait_ms=10_000, max_batch=pairs), precision="fp32")
    passes = _record_passes(app, monkeypatch, fail_on="the failing one")
    bad = [(encode(scene(24, 18, seed=3)), ["the failing one"], "json"),  # fails in the model
           (b"not an image", ["the box"], "json"), (encode(scene(24, 18)), ["a"] * 5, "json")]  # refused before it
    with TestClient(app, raise_server_exceptions=False) as c:
        responses = _concurrently(c, good + bad)
    for r, expected in zip(responses[: len(good)], one_by_one):
        _assert_same_answer(_answer(r), expected)
    failed, not_an_image, too_many = responses[len(good):]
    _assert_error(failed, 500, "internal error (RuntimeError)")
    _assert_error(not_an_image, 400, "not an image file")
    _assert_error(too_many, 400, "5 expressions")
    # the shared pass failed; then each request ran alone, so only the failing one failed
    assert passes[0] == pairs and sorted(passes[1:]) == sorted([len(texts) for _, texts, _ in good] + [1])


def test_bad_batching_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        Batching(max_batch=0)
    for wait in (-1, float("nan"), 10_001):
        with pytest.raises(ValueError, match="0 to 10000 ms"):
            Batching(wait_ms=wait)


@pytest.mark.parametrize("option, value, needle", [("--max-batch", "0", "at least 1"),
                                                   ("--batch-wait-ms", "-5", "0 to 10000 ms")])
def test_bad_batching_options_are_one_sentence(capsys, option, value, needle):
    from sharedris.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "no-such-folder", option, value])  # refused before the model is looked for
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and needle in err and err.startswith("sharedris serve: error:")


# ------------------------------------------------------------------------------------- API key
KEY = "s3cret-Key_42"


def _auth(key: str = KEY, scheme: str = "Bearer") -> dict[str, str]:
    """The Authorization header with ``key``: as a bearer token, or as a Basic password (any user name)."""
    if scheme == "Basic":
        return {"Authorization": "Basic " + base64.b64encode(f"anyone:{key}".encode()).decode()}
    return {"Authorization": f"{scheme} {key}"}


def _every_route(app) -> list[tuple[str, str]]:
    """(method, path) of everything the app serves: the API, the pages and the docs' own files."""
    routes = []
    for route in app.routes:
        if isinstance(route, Mount):
            routes += [("GET", f"{route.path}/{f.name}") for f in sorted(Path(route.app.directory).iterdir())]
        else:
            routes += [(method, route.path) for method in sorted(route.methods - {"HEAD"})]
    return routes


def _call(client, method: str, path: str, headers: dict[str, str]):
    if (method, path) == ("POST", "/v1/segment"):
        return client.post(path, files={"image": ("a.png", encode(scene(24, 18, seed=3)))}, data={"text": ["the box"]},
                           headers=headers)
    return client.request(method, path, headers=headers)


def test_with_an_api_key_every_route_but_healthz_needs_it(model_dir):
    app = create_app(model_dir, limits=LIMITS, api_key=KEY)
    routes = _every_route(app)
    assert {("GET", "/"), ("GET", "/example.png"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/model"),
            ("POST", "/v1/segment"), ("GET", "/healthz")} <= set(routes)
    assert any(path.startswith("/static-offline-docs/") for _, path in routes)
    refused = [{}, _auth("wrong"), _auth("wrong", "Basic"), _auth(KEY + "x"), _auth(KEY[:-1]), _auth(KEY, "Token"),
               {"Authorization": "Basic !!!"}, {"Authorization": KEY}, {"X-Other": KEY}]
    accepted = [_auth(), _auth(KEY, "Basic"), {"Authorization": f"bearer  {KEY} "}]
    with TestClient(app) as c:
        for method, path in routes:
            for headers in refused:
                r = _call(c, method, path, headers)
                if path == "/healthz":
                    assert r.status_code == 200
                    continue
                _assert_error(r, 401, "API key", "Authorization: Bearer KEY")
                assert r.headers["www-authenticate"].startswith("Basic ")  # browsers ask for the key
            for headers in accepted:
                assert _call(c, method, path, headers).status_code == 200, (method, path, headers)
        _assert_error(c.get("/no/such/path"), 401, "API key")  # nothing about the service without the key ...
        _assert_error(c.get("/no/such/path", headers=_auth()), 404, "GET /docs")  # ... and with it, the usual
        too_big = np.zeros(LIMITS.max_upload_bytes + FORM_ALLOWANCE, dtype=np.uint8).tobytes()
        _assert_error(_post(c, too_big, ["a"]), 401, "API key")  # refused before the body is read
        assert c.get("/healthz").json()["api_key_required"] is True


def _serve_app(monkeypatch, *args: str):
    """The app that ``sharedris serve ARGS`` would run (uvicorn is not started)."""
    import uvicorn

    from sharedris.cli import main

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    main(["serve", "--port", "0", *args])
    return apps[0]


def test_serve_takes_the_key_from_the_environment_or_the_flag_and_never_logs_it(model_dir, monkeypatch, caplog,
                                                                               capsys):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("SHAREDRIS_API_KEY", KEY)
    seen = []
    with TestClient(_serve_app(monkeypatch, "--model", str(model_dir))) as c:
        assert c.get("/v1/model").status_code == 401 and c.get("/v1/model", headers=_auth()).status_code == 200
        seen.append(c.get("/healthz").text)
    flag_key = "0ther-Key"
    with TestClient(_serve_app(monkeypatch, "--model", str(model_dir), "--api-key", flag_key)) as c:
        assert c.get("/v1/model", headers=_auth()).status_code == 401  # the flag wins over the environment
        assert c.get("/v1/model", headers=_auth(flag_key)).status_code == 200
        seen.append(c.get("/healthz").text)
    monkeypatch.delenv("SHAREDRIS_API_KEY")
    with TestClient(_serve_app(monkeypatch, "--model", str(model_dir))) as c:
        assert c.get("/v1/model").status_code == 200  # no key: an open service
        assert c.get("/healthz").json()["api_key_required"] is False
    out, err = capsys.readouterr()
    assert caplog.text.count("needs the API key") == 2 and "no API key" in caplog.text  # the startup lines
    for key in (KEY, flag_key):
        assert key not in caplog.text + out + err + "".join(seen)


@pytest.mark.parametrize("source", ["--api-key", "SHAREDRIS_API_KEY"])
@pytest.mark.parametrize("key", ["", "two words", "naïve-key"])
def test_a_key_that_cannot_be_sent_is_one_sentence_that_does_not_show_it(capsys, monkeypatch, source, key):
    from sharedris.cli import main

    args = ["serve", "--model", "no-such-folder"]  # refused before the model is looked for
    if source == "--api-key":
        args += ["--api-key", key]
    else:
        monkeypatch.setenv(source, key)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and f"error: {source}: the API key must be" in err
    assert not key or key not in err


@pytest.mark.slow
def test_a_running_service_never_writes_its_key_to_its_log(tmp_path, model_dir, monkeypatch):
    import httpx
    from test_browser import _serve

    monkeypatch.setenv("SHAREDRIS_API_KEY", KEY)  # the server process inherits it
    server = _serve(tmp_path, model_dir)  # `sharedris serve` as a real process, its output in server.log
    url = next(server)
    try:
        image = {"image": ("a.png", encode(scene(24, 18, seed=3)))}
        statuses = [httpx.post(f"{url}/v1/segment", files=image, data={"text": "the box"}, headers=_auth()).status_code,
                    httpx.get(f"{url}/v1/model", headers=_auth(KEY, "Basic")).status_code,
                    httpx.get(f"{url}/v1/model", headers=_auth(KEY + "x")).status_code,
                    httpx.get(f"{url}/docs").status_code]
    finally:
        server.close()
    log = (tmp_path / "server.log").read_text()
    assert statuses == [200, 200, 401, 401]
    for line in ('"POST /v1/segment HTTP/1.1" 200', '"GET /v1/model HTTP/1.1" 200', '"GET /v1/model HTTP/1.1" 401',
                 "every route but /healthz needs the API key"):
        assert line in log  # the access log and the startup line were captured ...
    for secret in (KEY, base64.b64encode(f"anyone:{KEY}".encode()).decode()):
        assert secret not in log  # ... and the key is in neither
