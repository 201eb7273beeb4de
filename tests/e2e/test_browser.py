"""The demo page in headless Chromium: a real service with the trained demo models, a real browser.

Debian's ``chromium`` driven by Playwright through its executable path: nothing is downloaded.
Without Chromium or Playwright the tests fail under CI (``CI=true``) and are skipped elsewhere.
Screenshots go to each test's ``tmp_path``; set ``MODSERVE_SCREENSHOTS=DIR`` to copy them there too
(``docs/demo-screenshot.png`` is made that way).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.demo.data import make_sample
from app.demo.train import EXTRA_RADIUS, SAMPLE_SEED, SAMPLE_SIZE, SAMPLES, seg_target
from app.demo.trained import write_trained_models
from support.server import Server, free_port, run_server

pytestmark = pytest.mark.e2e

STATIC = Path(__file__).resolve().parents[2] / "app" / "static"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 20_000


def _missing(what: str) -> None:
    message = f"{what}; the test setup installs it (apt-get install -y chromium; pip install -e '.[test]')"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _chromium() -> str:
    candidates = (os.environ.get("MODSERVE_CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium")
    for candidate in candidates:
        if candidate and (path := shutil.which(candidate)):
            return path
    _missing("no Chromium executable (chromium, chromium-browser or MODSERVE_CHROMIUM)")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("trained-store")
    assert write_trained_models(store) == ["shapes_unet", "shapes_extra"]
    port = free_port()
    args = ["-m", "app", "--store", str(store), "--port", str(port), "--device", "cpu"]
    logs = tmp_path_factory.mktemp("logs")
    with run_server(args, port=port, log_dir=logs, ready_path="/v2/health/ready") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    # bypass_csp: the page's CSP forbids eval, which Playwright's wait_for_function needs.
    context = browser.new_context(viewport={"width": 1280, "height": 820}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.wait_for_selector("#models[data-state=ready]")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _screenshot(page: Any, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if target := os.environ.get("MODSERVE_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def _wait_answer(page: Any, after_seq: int) -> int:
    page.wait_for_function(
        "seq => { const r = document.getElementById('result');"
        " return r.dataset.state === 'done' && Number(r.dataset.seq) > seq; }",
        arg=after_seq,
    )
    return int(page.get_attribute("#result", "data-seq"))


def _seq(page: Any) -> int:
    return int(page.get_attribute("#result", "data-seq"))


def _overlay_alpha(page: Any) -> np.ndarray:
    width, height, alpha = page.evaluate(
        """() => {
            const c = document.getElementById('overlay');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const a = new Array(c.width * c.height);
            for (let i = 0; i < a.length; i++) a[i] = d[4 * i + 3];
            return [c.width, c.height, a];
        }"""
    )
    return np.asarray(alpha, dtype=np.uint8).reshape(height, width)


def _sample_truth(stem: str) -> np.ndarray:
    """The sample's ground-truth mask, regenerated; the shipped PNG must be that very image."""
    _, _, kinds, colours, index = next(s for s in SAMPLES if s[0] == stem)
    sample = make_sample(SAMPLE_SEED, index, size=SAMPLE_SIZE, kinds=kinds, colours=colours,
                         radius=None if len(kinds) > 1 else EXTRA_RADIUS)
    shipped = np.asarray(Image.open(STATIC / "samples" / f"{stem}.png").convert("RGB"))
    assert np.array_equal(shipped, sample.image), f"{stem}.png is not the generator's sample any more"
    return seg_target(sample.mask).astype(bool)


def test_page_and_static_files_are_served(server: Server) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in r.text
    for path, kind in (("/static/app.js", "text/javascript"), ("/static/style.css", "text/css"),
                       ("/static/samples/index.json", "application/json"),
                       ("/static/samples/red-disc.png", "image/png")):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
    for path in ("/static/../demo_trained.py", "/static/%2e%2e/demo_trained.py", "/static/nope.js",
                 "/static/samples"):
        r = httpx.get(server.url + path)
        assert r.status_code == 404 and "error" in r.json(), path


def test_mask_is_drawn_where_the_shapes_are(page: Any, tmp_path: Path) -> None:
    assert page.is_checked("#model-shapes_unet"), "the trained U-Net is the default model"
    page.click("button.sample[data-file='three-shapes.png']")
    _wait_answer(page, 0)
    page.wait_for_selector("#overlay[data-drawn=true]")

    alpha = _overlay_alpha(page)
    truth = _sample_truth("three-shapes")
    assert alpha.shape == truth.shape == (SAMPLE_SIZE, SAMPLE_SIZE)
    drawn = alpha > 0
    iou = (drawn & truth).sum() / (drawn | truth).sum()
    assert iou > 0.85, f"overlay vs the shapes: IoU {iou:.3f}"
    # Each shape is painted around the point the sample index names, and the rest stays clear.
    index = json.loads((STATIC / "samples" / "index.json").read_text())
    shapes = next(s for s in index["samples"] if s["file"] == "three-shapes.png")["shapes"]
    assert len(shapes) == 3
    outside = np.ones_like(drawn)
    for shape in shapes:
        cx, cy = (int(round(v)) for v in shape["center"])
        assert drawn[cy - 3 : cy + 4, cx - 3 : cx + 4].all(), f"{shape} is not painted"
        x0, y0, x1, y1 = shape["bbox"]
        outside[max(y0 - 3, 0) : y1 + 3, max(x0 - 3, 0) : x1 + 3] = False
    assert drawn[outside].mean() < 0.01

    assert "shape" in page.inner_text("#heads")  # class_fractions as a labelled bar chart
    assert page.inner_text("#version") == "1"
    assert page.inner_text("#latency").endswith("ms")
    page.fill("#opacity", "0.3")
    page.dispatch_event("#opacity", "input")
    assert page.eval_on_selector("#overlay", "c => c.style.opacity") == "0.3"
    page.fill("#opacity", "0.55")
    page.dispatch_event("#opacity", "input")
    _screenshot(page, tmp_path / "demo-screenshot.png")


def test_changing_the_scalar_changes_the_label(page: Any, tmp_path: Path) -> None:
    page.check("#model-shapes_extra")
    assert page.is_visible("#scalar")
    page.fill("#scalar", "0.1")
    page.click("button.sample[data-file='green-triangle.png']")
    seq = _wait_answer(page, 0)
    page.wait_for_function("() => document.getElementById('model-name').textContent === 'shapes_extra'")
    # The sample click may have answered before the scalar was typed: ask once more to be sure.
    page.press("#scalar", "Enter")
    seq = _wait_answer(page, seq)
    low = page.inner_text("#label")
    page.fill("#scalar", "0.9")
    page.press("#scalar", "Enter")
    _wait_answer(page, seq)
    high = page.inner_text("#label")
    assert (low, high) == ("green / low", "green / high")
    bars = page.locator("#heads li").all_inner_texts()
    assert len(bars) == 6 and any("green / high" in b for b in bars)
    assert page.get_attribute("#heads li.best", "data-label") == "green / high"
    assert page.inner_text("#version") == "1"
    assert not page.is_visible("#opacity-row"), "a classifier draws no mask"
    _screenshot(page, tmp_path / "demo-scalar.png")


def test_api_errors_are_shown_as_readable_messages(page: Any) -> None:
    junk = {"name": "junk.png", "mimeType": "image/png", "buffer": b"not an image"}
    page.set_input_files("#file", files=[junk])
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert message.startswith("shapes_unet: HTTP 4"), message
    assert "{" not in message, "the message is the API's text, not raw JSON"
    assert page.get_attribute("#result", "data-state") == "error"

    # A scalar that is not a number is explained before anything is sent.
    page.check("#model-shapes_extra")
    seq = _seq(page)
    page.click("button.sample[data-file='red-disc.png']")
    _wait_answer(page, seq)
    page.fill("#scalar", "lots")
    page.press("#scalar", "Enter")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('number')")


def test_sample_images_are_the_generator_samples() -> None:
    index = json.loads((STATIC / "samples" / "index.json").read_text())
    assert [s["file"] for s in index["samples"]] == [f"{s[0]}.png" for s in SAMPLES]
    for stem, *_ in SAMPLES:
        _sample_truth(stem)
        assert Image.open(io.BytesIO((STATIC / "samples" / f"{stem}.png").read_bytes())).size == (192, 192)
