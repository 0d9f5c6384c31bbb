"""The demo page in a real headless Chromium, against `sharedris serve` running as a real process:
results side by side at 1280 px, each captioned as `sharedris predict` prints it, overlays drawn as
the CLI draws them, "no match" plainly, the words the model does not know, the favicon, no console
errors.

Needs Debian's Chromium and ChromeDriver (``apt-get install -y chromium chromium-driver``) and
Selenium (dev extra). Without them the tests skip, saying how to run them; with
``SHAREDRIS_REQUIRE_BROWSER=1`` (set by ``.ci/run``) a missing browser fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from _tiny_model import save_tiny_model, scene
from PIL import Image, ImageDraw

from sharedris.render import DIM, overlay

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "install them with: apt-get install -y chromium chromium-driver"
REQUIRED = os.environ.get("SHAREDRIS_REQUIRE_BROWSER") == "1"  # CI: a missing browser is a failure
# Flags for a sandboxed machine with no network: no background traffic, no first-run UI.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(reason: str) -> None:
    """Skip (fail when SHAREDRIS_REQUIRE_BROWSER=1) because ``reason``."""
    if REQUIRED:
        pytest.fail(f"{reason} (SHAREDRIS_REQUIRE_BROWSER=1 makes this a failure)")
    pytest.skip(f"{reason}; then run: SHAREDRIS_REQUIRE_BROWSER=1 python -m pytest tests/test_browser.py")


@pytest.fixture(scope="module")
def webdriver_tools():
    """Selenium's ``webdriver`` and ``Service``, once Chromium and ChromeDriver are known to be there."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) or shutil.which(p))]
    if missing:
        _missing(f"the browser test needs {' and '.join(missing)}; {INSTALL}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("the browser test needs Selenium; install the dev extra: pip install -e '.[dev]'")
    return webdriver, Service


def _serve(folder: Path, model: Path) -> Iterator[str]:
    """``sharedris serve`` of ``model`` as a real process, until the generator is closed; yields its URL."""
    port = _free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sharedris", "serve", "--model", str(model), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sharedris serve did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server_folder(tmp_path_factory) -> Path:
    """Where ``server`` keeps its model and its log, server.log (one line per request)."""
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def server(server_folder, webdriver_tools):
    """A tiny model that finds every expression present, with an open vocabulary."""
    yield from _serve(server_folder, save_tiny_model(server_folder / "tiny", presence_bias=20.0))


@pytest.fixture(scope="module")
def no_match_server(tmp_path_factory, webdriver_tools):
    """A tiny model that finds no expression present and knows only "the", "red", "box"."""
    folder = tmp_path_factory.mktemp("browser_no_match")
    yield from _serve(folder, save_tiny_model(folder / "nomatch", presence_bias=-20.0,
                                              vocabulary=["the", "red", "box"], description="synthetic shape scenes"))


@pytest.fixture
def browser(tmp_path, webdriver_tools):
    webdriver, Service = webdriver_tools
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for get_log("browser")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


RESULTS_SHOWN = """
const imgs = Array.from({length: arguments[0]}, (_, i) => document.getElementById('overlay-' + i));
return imgs.every(i => i && i.complete && i.naturalWidth > 0);"""
FAILED = "return document.getElementById('status').className === 'error';"
# For every image shown, draw it on a canvas of its natural size (then read ``ctx``).
EACH_SHOWN_IMAGE = """
return Array.from(document.querySelectorAll('#results img')).map(img => {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);"""
# Every image shown: its natural and displayed size and how many colours it has.
SHOWN_IMAGES = EACH_SHOWN_IMAGE + """
  const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const seen = new Set();
  for (let k = 0; k < px.length; k += 4) seen.add((px[k] << 16) | (px[k + 1] << 8) | px[k + 2]);
  const box = img.getBoundingClientRect();
  return [img.naturalWidth, img.naturalHeight, box.width, box.height, seen.size];
});"""

# Every image shown: its RGBA pixels at its natural size, row by row.
SHOWN_PIXELS = EACH_SHOWN_IMAGE + """
  return Array.from(ctx.getImageData(0, 0, canvas.width, canvas.height).data);
});"""


def _count_segment_requests(browser) -> None:
    browser.execute_script("""
        window.segmentRequests = 0;
        const original = window.fetch;
        window.fetch = (url, options) => {
          if (String(url).startsWith('/v1/segment')) window.segmentRequests += 1;
          return original(url, options);
        };""")


def _wait_for_results(browser, n: int) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 90).until(lambda d: d.execute_script(RESULTS_SHOWN, n) or d.execute_script(FAILED))
    status = browser.find_element(By.ID, "status").text
    assert not browser.execute_script(FAILED), status
    assert status.startswith("Done")
    return status


def _assert_results_readable(browser, width: int, height: int, texts: list[str]) -> None:
    from selenium.webdriver.common.by import By

    shown = browser.execute_script(SHOWN_IMAGES)
    assert len(shown) == len(texts)
    for natural_w, natural_h, box_w, box_h, distinct in shown:
        assert (natural_w, natural_h) == (width, height)  # the overlay at the image's own size ...
        assert 256 <= box_w <= 520 and abs(box_w / box_h - width / height) < 0.02  # ... shown large
        assert distinct > 10  # a real picture, not a blank or broken image
    captions = [e.text for e in browser.find_elements(By.TAG_NAME, "figcaption")]
    for caption, text in zip(captions, texts):  # as `sharedris predict` prints it
        assert re.fullmatch(r"[01]\.\d\d\d  " + re.escape(repr(text)) + r" \(presence 1\.00\)", caption), caption
    assert not browser.find_element(By.ID, "warning").is_displayed()  # an open vocabulary: nothing unknown


# Every image on the page that is displayed: whether it has loaded a picture (not a broken-image icon).
DISPLAYED_IMAGES_LOADED = """
return Array.from(document.images).filter(i => i.getClientRects().length > 0)
            .map(i => [i.id, i.complete && i.naturalWidth > 0]);"""
# Each result figure's box, and the viewport's width without the scroll bar.
FIGURE_BOXES = """
return [document.documentElement.clientWidth, document.documentElement.scrollWidth,
        Array.from(document.querySelectorAll('#results figure')).map(f => {
          const r = f.getBoundingClientRect();
          return [r.left, r.top, r.right];
        })];"""


def _assert_no_console_errors(browser) -> None:
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_demo_page_shows_results_side_by_side_at_1280px(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    image = tmp_path / "street.png"
    scene(96, 64, seed=3).save(image)
    texts = ["the red box on the left", "the green one", "the top one", "it's the \"big\" one"]
    browser.set_window_size(1280, 900)
    browser.get(f"{server}/")
    assert browser.execute_script("return window.innerWidth;") == 1280
    assert not browser.find_element(By.ID, "preview").is_displayed()  # nothing chosen: no empty image
    assert browser.execute_script(DISPLAYED_IMAGES_LOADED) == []
    _count_segment_requests(browser)
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "texts").send_keys("\n".join(texts))
    browser.find_element(By.ID, "segment").click()
    _wait_for_results(browser, len(texts))
    assert browser.execute_script("return window.segmentRequests;") == 1
    _assert_results_readable(browser, 96, 64, texts)
    assert all(loaded for _, loaded in browser.execute_script(DISPLAYED_IMAGES_LOADED))
    viewport, page_width, boxes = browser.execute_script(FIGURE_BOXES)
    assert page_width <= viewport  # nothing sticks out sideways
    assert all(0 <= left and right <= viewport for left, _, right in boxes)
    tops = [top for _, top, _ in boxes]
    assert tops[0] == tops[1] == tops[2] < tops[3]  # three side by side, the fourth on the next row
    _assert_no_console_errors(browser)


def test_demo_page_has_a_favicon_from_the_service(server, server_folder, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/")
    href = browser.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href")
    assert href == f"{server}/favicon.svg"  # the service's own, nothing fetched from elsewhere
    # the browser asked for it, and got it
    WebDriverWait(browser, 10).until(
        lambda _: '"GET /favicon.svg HTTP/1.1" 200' in (server_folder / "server.log").read_text())
    status, kind, body = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(async r => done([r.status, r.headers.get('content-type'), await r.text()]));""",
                                                      href)
    assert (status, kind) == (200, "image/svg+xml") and body.startswith("<svg")
    _assert_no_console_errors(browser)


def test_demo_page_describes_the_model_and_runs_the_example_in_one_click(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with urllib.request.urlopen(f"{server}/v1/model", timeout=10) as r:
        about = json.load(r)
    browser.get(f"{server}/")
    WebDriverWait(browser, 30).until(lambda d: about["description"] in d.find_element(By.ID, "model").text)
    _count_segment_requests(browser)
    browser.find_element(By.ID, "example").click()
    _wait_for_results(browser, len(about["example_texts"]))
    assert browser.execute_script("return window.segmentRequests;") == 1
    assert browser.find_element(By.ID, "texts").get_attribute("value").splitlines() == about["example_texts"]
    _assert_results_readable(browser, 256, 256, about["example_texts"])  # the bundled example is 256x256


def test_demo_page_shows_service_errors(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    browser.get(f"{server}/")
    browser.find_element(By.ID, "image").send_keys(str(bad))
    browser.find_element(By.ID, "texts").send_keys("the box")
    browser.find_element(By.ID, "segment").click()
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script("return document.getElementById('status').className === 'error';"))
    assert "not an image file" in browser.find_element(By.ID, "status").text


def test_demo_page_decodes_coco_rle_like_pycocotools(server, browser):
    import numpy as np
    from pycocotools import mask as mask_utils

    browser.get(f"{server}/")
    rng = np.random.default_rng(0)
    for h, w in [(23, 37), (64, 1), (300, 200)]:
        mask = rng.random((h, w)) < rng.random()
        mask[: h // 2, : w // 3] = True  # long runs as well as short ones
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        decoded = browser.execute_script("return Array.from(decodeMask(arguments[0]));", rle)
        np.testing.assert_array_equal(np.asarray(decoded, dtype=bool).reshape(h, w), mask)


# The page's overlay of the image at data URL arguments[0] with the mask arguments[1] (0/1, row-major),
# arguments[2] x arguments[3] pixels: its RGBA pixels.
PAGE_OVERLAY = """
const [src, mask, w, h] = arguments, done = arguments[arguments.length - 1];
const img = new Image();
img.onload = async () => {
  const canvas = overlayCanvas(await createImageBitmap(img), Uint8Array.from(mask), w, h, true);
  done(Array.from(canvas.getContext('2d').getImageData(0, 0, w, h).data));
};
img.src = src;"""


@pytest.mark.parametrize("colour, background, size", [((240, 220, 40), (240, 240, 235), (96, 64)),
                                                      ((30, 60, 220), (20, 90, 110), (300, 200))])
def test_demo_page_draws_overlays_as_the_cli_does(server, browser, colour, background, size):
    import base64
    import io

    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.ellipse((w // 8, h // 8, w // 2, h * 3 // 4), fill=colour)
    draw.rectangle((w * 5 // 8, h // 4, w * 7 // 8, h // 2), fill=colour)
    draw.line((0, h - 3, w, h - 3), fill=colour)  # a thin one along the edge
    mask = (np.asarray(img) == colour).all(-1)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    browser.get(f"{server}/")
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    pixels = browser.execute_async_script(PAGE_OVERLAY, src, mask.astype(int).ravel().tolist(), w, h)
    shown = np.asarray(pixels, dtype=np.int16).reshape(h, w, 4)[..., :3]
    expected = np.asarray(overlay(img, mask, "the shapes"))[-h:]
    assert np.abs(shown - expected).max() <= 1  # the same picture, up to rounding


def test_demo_page_shows_no_match_plainly_and_the_unknown_words(no_match_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    image = tmp_path / "scene.png"
    scene(96, 64, seed=3).save(image)
    browser.get(f"{no_match_server}/")
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "texts").send_keys("the red box\nthe cat")
    browser.find_element(By.ID, "segment").click()
    _wait_for_results(browser, 2)
    captions = [e.text for e in browser.find_elements(By.TAG_NAME, "figcaption")]
    assert captions == ["no match  'the red box' (presence 0.00)", "no match  'the cat' (presence 0.00)"]
    badges = browser.find_elements(By.CSS_SELECTOR, "#results figure .badge")
    assert [b.text for b in badges] == ["no match"] * 2 and all(b.is_displayed() for b in badges)
    # the picture as the CLI draws it for "no match" (its label aside): grey and dim all over
    uploaded = np.asarray(Image.open(image).convert("RGB"))
    for pixels in browser.execute_script(SHOWN_PIXELS):
        shown = np.asarray(pixels, dtype=np.int16).reshape(64, 96, 4)[..., :3]
        assert (shown.max(-1) - shown.min(-1) <= 1).all() and shown.max() <= DIM * uploaded.max() + 1
        assert np.abs(shown - uploaded).max() > 64
    _assert_no_console_errors(browser)
    warning = browser.find_element(By.ID, "warning")
    assert warning.is_displayed()
    assert warning.text == "the model nomatch was trained on synthetic shape scenes and does not know: cat"
