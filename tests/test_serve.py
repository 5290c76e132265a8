"""``captioner serve``: a real server on a loopback port, good and bad requests, batching,
the export backend, and the page driven in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from captioner.generate.captioner import Captioner
from captioner.serve.batching import BatchingOptions, MicroBatcher
from captioner.serve.loadtest import LoadSpec, free_port, run_load, start_server, stop_server

from .conftest import call_cli


@pytest.fixture(scope="module")
def images(shapes_dir) -> list[Path]:
    return sorted((shapes_dir / "images").glob("*.png"))[:4]


@pytest.fixture(scope="module")
def server(trained_run):
    """The server over the tiny run, with a long batching window so that concurrent
    requests are sure to share a batch."""
    port = free_port()
    proc = start_server(["--run", str(trained_run), "--window-ms", "300", "--max-body-mb",
                         "1"], port, max_batch=16)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def post_files(url: str, files: list[tuple[str, tuple[str, bytes, str]]]) -> httpx.Response:
    return httpx.post(f"{url}/v1/caption", files=files, timeout=60)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_health_names_the_model_and_grid(server, trained_run):
    body = httpx.get(f"{server}/health").json()
    assert body["status"] == "ok" and body["grid"] == [8, 8] and body["image_size"] == 32
    assert body["molecules"] == "off"  # a caption model: no molecule drawings
    assert str(Path(trained_run).resolve()) in body["model"]


def test_caption_matches_the_captioner(server, trained_run, images):
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in images]
    r = post_files(server, files)
    assert r.status_code == 200
    body = r.json()
    gen = Captioner.load(trained_run).generate(images)
    assert [x["text"] for x in body["results"]] == gen.texts
    assert [x["image"] for x in body["results"]] == [p.name for p in images]
    for res, ids in zip(body["results"], gen.tokens):
        assert res["token_ids"] == ids and len(res["tokens"]) == len(ids)
        assert "molecule" not in res
        att = np.array(res["attention"])
        assert att.shape == (len(ids), 64)
        np.testing.assert_allclose(att.sum(1), 1.0, atol=1e-3)
        assert len(res["token_scores"]) == len(ids) and all(s <= 0 for s in res["token_scores"])
    as_json = httpx.post(f"{server}/v1/caption", timeout=60, json={
        "images": [base64.b64encode(p.read_bytes()).decode() for p in images[:2]]})
    assert [x["text"] for x in as_json.json()["results"]] == gen.texts[:2]


BAD = {
    "text.png": (b"just some text\n", 415, "not_an_image"),
    "empty.jpg": (b"", 400, "empty"),
    "bomb.png": (None, 413, "too_large"),
    "cut.png": (None, 400, "truncated"),
}


def bad_bytes(name: str, good: bytes) -> bytes:
    if name == "bomb.png":
        buf = io.BytesIO()
        Image.new("1", (9000, 9000)).save(buf, "PNG")  # 81 Mpx in a few KB
        return buf.getvalue()
    if name == "cut.png":
        return good[: len(good) // 2]
    return BAD[name][0]


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_image_gets_a_4xx_naming_it_and_the_server_goes_on(server, images, name):
    good = images[0].read_bytes()
    r = post_files(server, [("image", (name, bad_bytes(name, good), "image/png"))])
    _, status, code = BAD[name]
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and name in r.json()["error"]["message"]
    again = post_files(server, [("image", ("ok.png", good, "image/png"))])
    assert again.status_code == 200 and again.json()["results"][0]["text"]


def test_good_images_beside_bad_ones_still_get_results(server, images):
    good = images[0].read_bytes()
    files = [("image", ("a.png", good, "image/png")),
             ("image", ("text.png", b"nope", "image/png")),
             ("image", ("b.png", good, "image/png"))]
    body = post_files(server, files).json()
    assert [("error" in x, x["image"]) for x in body["results"]] == [
        (False, "a.png"), (True, "text.png"), (False, "b.png")]
    assert body["results"][0]["text"] == body["results"][2]["text"]


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"files": [("file", ("a.png", b"x", "image/png"))]}, 400, "no_image_field"),
    ({"data": {"image": "not a file"}, "files": [("other", ("o.txt", b"x", "text/plain"))]},
     400, "not_a_file"),
    ({"json": {"picture": "x"}}, 400, "no_image_field"),
    ({"json": {"images": ["%%%"]}}, 400, "bad_base64"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
     "bad_json"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415,
     "unsupported_content_type"),
    ({"files": [("image", ("big.png", b"\0" * 1_100_000, "image/png"))]}, 413,
     "body_too_large"),
])
def test_bad_requests_get_a_4xx_json_error(server, kwargs, status, code):
    r = httpx.post(f"{server}/v1/caption", timeout=60, **kwargs)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


def test_concurrent_requests_share_a_batch(server, images):
    before = httpx.get(f"{server}/health").json()["batches"]
    data = [p.read_bytes() for p in images]
    out = run_load(int(server.rsplit(":", 1)[1]), data, LoadSpec(clients=8, requests=8))
    assert out["errors"] == 0 and out["requests"] == 8
    after = httpx.get(f"{server}/health").json()["batches"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == 8  # every image decoded once
    assert max(new) > 1  # at least one batch held several requests' images


def test_micro_batcher_fails_only_the_batch_that_failed():
    async def scenario():
        calls = []

        def decode(pixels):
            calls.append(len(pixels))
            if pixels[0, 0, 0, 0] == 7:
                raise RuntimeError("boom")
            return [int(p[0, 0, 0]) for p in pixels]

        batcher = MicroBatcher(decode, BatchingOptions(max_batch=4, window_ms=1))
        batcher.start()
        bad = await asyncio.gather(batcher.submit([np.full((1, 1, 3), 7, np.uint8)]),
                                   return_exceptions=True)
        good = await batcher.submit([np.full((1, 1, 3), i, np.uint8) for i in range(6)])
        await batcher.stop()
        return bad, good, calls

    bad, good, calls = asyncio.run(scenario())
    assert isinstance(bad[0], RuntimeError) and good == list(range(6))
    assert max(calls) <= 4 and sum(calls) == 7


def test_export_backend_serves_the_same_texts(trained_run, exported_run, images):
    port = free_port()
    proc = start_server(["--export", str(exported_run.parent)], port, max_batch=8)
    try:
        url = f"http://127.0.0.1:{port}"
        body = post_files(url, [("image", (p.name, p.read_bytes(), "image/png"))
                                for p in images]).json()
        gen = Captioner.load(trained_run).generate(images)
        assert [x["text"] for x in body["results"]] == gen.texts
        assert [x["token_ids"] for x in body["results"]] == gen.tokens
        assert post_files(url, [("image", ("t.png", b"nope", "image/png"))]).status_code == 415
    finally:
        stop_server(proc)


# ---- the page, driven in headless Chromium ------------------------------------------


def _driver(tmp: str):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver are needed (apt-get install chromium "
                    "chromium-driver)")
    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={tmp}",
                "--window-size=1200,900"):
        opts.add_argument(arg)
    try:
        return webdriver.Chrome(service=Service(driver), options=opts)
    except Exception as exc:  # noqa: BLE001 - a browser that cannot start here
        pytest.skip(f"chromium could not start: {exc}")


def test_page_picks_an_image_shows_the_caption_and_attention(server, images, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    evil = tmp_path / "<img src=x onerror=alert(1)>.png"
    evil.write_bytes(images[0].read_bytes())
    d = _driver(tempfile.mkdtemp())
    try:
        d.get(f"{server}/")
        d.find_element(By.ID, "file").send_keys(str(evil))
        WebDriverWait(d, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
        card = d.find_element(By.CSS_SELECTOR, "#cards .item")
        assert card.find_element(By.CSS_SELECTOR, ".pred").text
        assert "score" in card.find_element(By.CSS_SELECTOR, ".score").text
        name = card.find_element(By.CSS_SELECTOR, ".name").text
        assert name == evil.name and not d.find_elements(By.CSS_SELECTOR, "#cards img[src='x']")
        chips = card.find_elements(By.CSS_SELECTOR, ".tok")
        canvas = card.find_element(By.CSS_SELECTOR, "canvas.overlay")
        assert canvas.get_attribute("hidden") is not None  # no map before hovering

        def overlay():
            return d.execute_script("var c = arguments[0];"
                                    "return c.hidden ? null : c.toDataURL();", canvas)

        ActionChains(d).move_to_element(chips[0]).perform()
        first = overlay()
        assert first is not None and card.get_attribute("data-active-token") == "0"
        chips[0].click()  # pin token 0, then step with the arrow key
        chips[0].send_keys(Keys.ARROW_RIGHT)
        assert card.get_attribute("data-active-token") == "1"
        second = overlay()
        assert second is not None and second != first  # the map changed with the token
        d.save_screenshot(str(tmp_path / "serve_page.png"))
        assert (tmp_path / "serve_page.png").stat().st_size > 10_000
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        d.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(d, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
        assert "not_an_image" in d.find_element(By.ID, "status").text
    finally:
        d.quit()


def test_cli_serve_refuses_decoding_flags_with_an_export(tmp_path):
    r = call_cli("serve", "--export", tmp_path, "--beam-size", "3")
    assert r.returncode == 2 and "decoding flags apply to --run" in r.stderr
