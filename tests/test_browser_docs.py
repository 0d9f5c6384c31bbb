"""The API documentation at /docs in a real headless Chromium that can reach nothing but the
service: Swagger UI must render from the service's own files. With an API key, a browser user
signs in once (any user name, the key as the password) and then uses /docs and the demo page.

Uses the browser, server and process fixtures of test_browser.py (same prerequisites: Debian's
Chromium and ChromeDriver, Selenium; ``SHAREDRIS_REQUIRE_BROWSER=1`` makes their absence a failure).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from _tiny_model import save_tiny_model
from test_browser import _serve, browser, server, server_folder, webdriver_tools  # noqa: F401 - fixtures used by name

pytestmark = pytest.mark.slow

KEY = "browser-s3cret"
SEGMENT_OPERATION = "#operations-default-segment_v1_segment_post"  # Swagger UI's element for POST /v1/segment
# fetch(url) in the page, as "loaded" or "blocked" (no-cors: any answer at all counts as loaded)
FETCH = """const done = arguments[arguments.length - 1];
fetch(arguments[0], {mode: 'no-cors', cache: 'no-store'}).then(() => done('loaded'), () => done('blocked'));"""


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, webdriver_tools):  # noqa: F811
    """The service with an API key (from the environment, as the docs advise)."""
    folder = tmp_path_factory.mktemp("browser_key")
    model = save_tiny_model(folder / "tiny", presence_bias=20.0)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SHAREDRIS_API_KEY", KEY)
        process = _serve(folder, model)
        url = next(process)  # the process has started, with the key in its environment
    yield url
    process.close()


def _only_the_service(browser, url: str) -> None:  # noqa: F811
    """Block every request the page makes except those to ``url``, and check that the block works."""
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urlPatterns": [
        {"urlPattern": f"{url}/*", "block": False},  # the first pattern that matches decides
        {"urlPattern": "*://*:*/*", "block": True}]})
    port = urlsplit(url).port
    browser.get(f"{url}/healthz")
    assert browser.execute_async_script(FETCH, f"{url}/healthz") == "loaded"
    # the same service under another name is another origin: blocked like any site on the internet
    assert browser.execute_async_script(FETCH, f"http://localhost:{port}/healthz") == "blocked"


def _assert_swagger_ui_rendered(browser, url: str) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{url}/docs")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, SEGMENT_OPERATION))
    operation = browser.find_element(By.CSS_SELECTOR, SEGMENT_OPERATION)
    assert "/v1/segment" in operation.text and "POST" in operation.text
    for path in ("/v1/model", "/healthz"):
        assert path in browser.find_element(By.CSS_SELECTOR, ".swagger-ui").text
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert any(name.endswith(".js") for name in loaded)  # Swagger UI's script, from ...
    assert all(name.startswith(f"{url}/") for name in loaded), loaded  # ... the service, like everything else


def test_docs_render_with_only_the_service_reachable(server, browser):  # noqa: F811
    _only_the_service(browser, server)
    _assert_swagger_ui_rendered(browser, server)


def test_with_an_api_key_a_browser_signs_in_once_for_docs_and_demo_page(keyed_server, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _only_the_service(browser, keyed_server)
    browser.get(f"{keyed_server}/docs")  # not signed in: the browser asks for the key, and shows no docs
    assert not browser.find_elements(By.CSS_SELECTOR, ".swagger-ui")
    # what a person types when the browser asks (any user name, the key as the password) ...
    host = urlsplit(keyed_server).netloc
    browser.get(f"http://anyone:{KEY}@{host}/v1/model")
    # ... after which the browser sends it with every request: the pages, their files and their fetches
    _assert_swagger_ui_rendered(browser, keyed_server)
    browser.get(f"{keyed_server}/")
    WebDriverWait(browser, 30).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
