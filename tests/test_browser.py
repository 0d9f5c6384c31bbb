"""The demo page in a real headless Chromium, against `sharedris serve` running as a real process.

Needs Debian's Chromium and ChromeDriver (``apt-get install -y chromium chromium-driver``) and
Selenium (dev extra). A missing browser fails this test rather than skipping it: CI must run it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from _tiny_model import save_tiny_model, scene

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "install them with: apt-get install -y chromium chromium-driver"
# Flags for a sandboxed machine with no network: no background traffic, no first-run UI.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    model = save_tiny_model(folder / "tiny")
    port = _free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sharedris", "serve", "--model", str(model), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
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


@pytest.fixture
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) or shutil.which(p))]
    if missing:
        pytest.fail(f"the browser test needs {' and '.join(missing)}; {INSTALL}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs Selenium; install the dev extra: pip install -e '.[dev]'")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_demo_page_segments_an_uploaded_image(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "street.png"
    scene(96, 64, seed=3).save(image)
    browser.get(f"{server}/")
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "texts").send_keys("the red box on the left\nthe green one")
    browser.find_element(By.ID, "segment").click()

    loaded = ("const imgs = [0, 1].map(i => document.getElementById('overlay-' + i));"
              "return imgs.every(i => i && i.complete && i.naturalWidth > 0);")
    failed = "return document.getElementById('status').className === 'error';"
    WebDriverWait(browser, 90).until(lambda d: d.execute_script(loaded) or d.execute_script(failed))
    status = browser.find_element(By.ID, "status").text
    assert not browser.execute_script(failed), status
    assert status.startswith("Done")

    for i in (0, 1):
        width, height, distinct = browser.execute_script(
            """const img = document.getElementById(arguments[0]);
               const canvas = document.createElement('canvas');
               canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
               const ctx = canvas.getContext('2d');
               ctx.drawImage(img, 0, 0);
               const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
               const seen = new Set();
               for (let k = 0; k < px.length; k += 4) seen.add((px[k] << 16) | (px[k + 1] << 8) | px[k + 2]);
               return [img.naturalWidth, img.naturalHeight, seen.size];""", f"overlay-{i}")
        assert width == 96 and height > 64  # the image at its own size, caption bar on top
        assert distinct > 10  # a real picture, not a blank or broken image
    captions = [e.text for e in browser.find_elements(By.TAG_NAME, "figcaption")]
    assert captions[0].startswith("the red box on the left (score ") and captions[1].startswith("the green one")


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
