"""``captioner serve`` for SMILES models: the drawing in each result, ``POST /v1/draw``
with a reference, its refusals, and the page's molecule cards in headless Chromium.

The server here is the real application over a stand-in backend that reads every picture
as one fixed text (no TensorFlow model), so the tests cost no training."""

from __future__ import annotations

import base64
import io
import tempfile
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("rdkit")

from captioner.serve.app import ServeOptions, create_app  # noqa: E402
from captioner.serve.loadtest import free_port  # noqa: E402
from tests.test_serve import _driver  # noqa: E402


class FixedBackend:
    """Reads every picture as ``text``; ``text_kind`` as a run ("smiles", "caption") or
    an export (None) reports it."""

    image_size = 32
    grid_hw = (2, 2)

    def __init__(self, text: str, text_kind: str | None, crop_margin: float | None = None):
        self.text, self.text_kind, self.crop_margin = text, text_kind, crop_margin
        self.name = f"fixed {text_kind}"
        self.seen: list[np.ndarray] = []

    def caption(self, pixels: np.ndarray) -> list[dict]:
        self.seen.extend(pixels)
        tokens = list(self.text) if self.text_kind == "smiles" else self.text.split()
        n = len(tokens)
        return [{"text": self.text, "tokens": tokens, "token_ids": list(range(n)),
                 "score": -1.5, "token_scores": np.zeros(n, np.float32),
                 "attention": np.full((n, 4), 0.25, np.float32)} for _ in pixels]


def png(ink: bool = False) -> bytes:
    """A white 32 x 32 picture; ``ink``: a 200 x 100 one with 20 x 40 px of black ink."""
    buf = io.BytesIO()
    if ink:
        im = Image.new("RGB", (200, 100), "white")
        im.paste((0, 0, 0), (150, 20, 170, 60))
        im.save(buf, "PNG")
    else:
        Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_backend_that_cuts_to_the_ink_reads_the_cut_and_returns_it():
    """With ``crop_margin`` the model gets the picture cut to its ink (as ``caption`` and
    ``evaluate`` read it) and each result carries that cut as ``view``, for the page to
    draw the attention over; without it, the whole picture and no ``view``."""
    from captioner.data.images import load_view

    cutting = FixedBackend("CCO", "smiles", crop_margin=0.25)
    with TestClient(create_app(cutting)) as client:
        r = client.post("/v1/caption", files=[("image", ("m.png", png(ink=True), "image/png"))])
        assert client.get("/health").json()["crop_margin"] == 0.25
    assert r.status_code == 200, r.text
    view = load_view(png(ink=True), 0.25)
    assert view.box == (130, 10, 60)
    url = r.json()["results"][0]["view"]
    assert url.startswith("data:image/png;base64,")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert np.array_equal(shown, view.pixels) and shown.shape == (60, 60, 3)
    assert np.array_equal(cutting.seen[0], view.resized(32))
    whole = FixedBackend("CCO", "smiles")
    with TestClient(create_app(whole)) as client:
        r = client.post("/v1/caption", files=[("image", ("m.png", png(ink=True), "image/png"))])
    assert "view" not in r.json()["results"][0]
    assert not np.array_equal(whole.seen[0], cutting.seen[0])


def caption(text: str, kind: str | None) -> tuple[dict, dict]:
    """(first result, health) of one picture posted to a server over FixedBackend."""
    with TestClient(create_app(FixedBackend(text, kind))) as client:
        r = client.post("/v1/caption", files=[("image", ("m.png", png(), "image/png"))])
        assert r.status_code == 200, r.text
        return r.json()["results"][0], client.get("/health").json()


def test_smiles_model_results_carry_the_drawing():
    result, health = caption("OCC", "smiles")
    mol = result["molecule"]
    assert mol["prediction"]["valid"] and mol["prediction"]["canonical"] == "CCO"
    assert mol["prediction"]["svg"].startswith("<svg") and "<script" not in mol["prediction"]["svg"]
    assert mol["reference"] is None and mol["exact_match"] is None
    assert health["molecules"] == "every result" and health["draw"] is True


def test_invalid_smiles_from_the_model_says_so():
    mol = caption("C1CC", "smiles")[0]["molecule"]
    assert not mol["prediction"]["valid"] and mol["prediction"]["svg"] is None
    assert mol["note"] == "not a valid molecule"


def test_caption_models_skip_drawing():
    result, health = caption("a red circle", "caption")
    assert "molecule" not in result and result["text"] == "a red circle"
    assert health["molecules"] == "off"


@pytest.mark.parametrize(("text", "drawn"), [("CCO", True), ("a red circle", False)])
def test_exports_draw_texts_that_look_like_smiles(text, drawn):
    result, health = caption(text, None)
    assert ("molecule" in result) is drawn
    assert health["molecules"] == "results that look like SMILES"


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(FixedBackend("CCO", "smiles"),
                               ServeOptions(max_smiles_chars=50))) as c:
        yield c


def test_draw_highlights_what_differs_from_the_reference(client):
    r = client.post("/v1/draw", json={"smiles": "CCO", "reference": "CCN"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["exact_match"] is False
    assert body["prediction"]["differing_atoms"] == [2]
    assert body["reference"]["differing_atoms"] == [2]
    for side in ("prediction", "reference"):
        assert body[side]["svg"].startswith("<svg") and "<script" not in body[side]["svg"]
    same = client.post("/v1/draw", json={"smiles": "OCC", "reference": " CCO "}).json()
    assert same["exact_match"] is True and same["prediction"]["differing_atoms"] == []
    alone = client.post("/v1/draw", json={"smiles": "CCO", "reference": ""}).json()
    assert alone["reference"] is None and alone["note"] == "no reference"


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "bad_json"),
    ({"json": ["CCO"]}, 400, "no_smiles"),
    ({"json": {"reference": "CCO"}}, 400, "no_smiles"),
    ({"json": {"smiles": 5}}, 400, "no_smiles"),
    ({"json": {"smiles": "CCO", "reference": ["CCN"]}}, 400, "bad_reference"),
    ({"json": {"smiles": "C" * 51}}, 400, "too_long"),
    ({"json": {"smiles": "CCO", "reference": "C" * 51}}, 400, "too_long"),
    ({"json": {"smiles": "C1CC"}}, 400, "bad_smiles"),
    ({"json": {"smiles": "<script>alert(1)</script>"}}, 400, "bad_smiles"),
    ({"json": {"smiles": "CCO", "reference": "C(("}}, 400, "bad_reference"),
    ({"json": {"smiles": "CCO |$x;y;z$|"}}, 400, "bad_smiles"),
    ({"content": b"smiles=CCO", "headers": {"content-type": "text/plain"}}, 415,
     "unsupported_content_type"),
    ({"json": {"smiles": "CCO", "pad": "x" * 20_000}}, 413, "body_too_large"),
])
def test_draw_refuses_bad_requests_with_a_json_error(client, kwargs, status, code):
    r = client.post("/v1/draw", **kwargs)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert client.post("/v1/draw", json={"smiles": "CCO"}).status_code == 200  # still serving


# ---- the page, driven in headless Chromium ------------------------------------------


@pytest.fixture(scope="module")
def smiles_server():
    """The application over FixedBackend("CCO", "smiles", crop_margin=0.25) on a loopback
    port."""
    port = free_port()
    backend = FixedBackend("CCO", "smiles", crop_margin=0.25)  # pictures cut to their ink
    server = uvicorn.Server(uvicorn.Config(create_app(backend),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_page_draws_the_molecule_and_compares_with_a_typed_reference(smiles_server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    picture = tmp_path / "<img src=x onerror=alert(1)>.png"
    picture.write_bytes(png())
    inked = tmp_path / "inked.png"
    inked.write_bytes(png(ink=True))
    d = _driver(tempfile.mkdtemp())
    try:
        d.get(f"{smiles_server}/")
        d.find_element(By.ID, "file").send_keys(str(picture))
        WebDriverWait(d, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
        card = d.find_element(By.CSS_SELECTOR, "#cards .item")
        assert "mols" in card.get_attribute("class").split()
        # the picture under the attention is the cut the model read (blank: all of it)
        shown = card.find_element(By.CSS_SELECTOR, ".stage img")
        assert shown.get_attribute("src").startswith("data:image/png;base64,")
        d.find_element(By.ID, "file").send_keys(str(inked))
        WebDriverWait(d, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR,
                                                                 "#cards .item")) == 2)
        first = d.find_element(By.CSS_SELECTOR, "#cards .item")  # the newest card
        img = first.find_element(By.CSS_SELECTOR, ".stage img")
        WebDriverWait(d, 10).until(lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth;", img))
        size = d.execute_script("return [arguments[0].naturalWidth, "
                                "arguments[0].naturalHeight];", img)
        assert size == [60, 60]  # the 60 px square around the ink, not the 200 x 100 file

        def figures():
            return [f.get_attribute("class") for f in
                    card.find_elements(By.CSS_SELECTOR, "figure.mol")]

        def drawn(fig_class):  # the SVG decoded as an image with a size
            img = card.find_element(By.CSS_SELECTOR, f"figure.{fig_class} img.mol-svg")
            assert img.get_attribute("src").startswith("data:image/svg+xml")
            return d.execute_script("return arguments[0].complete && "
                                    "arguments[0].naturalWidth;", img)

        assert figures() == ["mol read plain"]
        WebDriverWait(d, 10).until(lambda _: drawn("read"))
        field = card.find_element(By.CSS_SELECTOR, "input.refsmiles")
        field.send_keys("CCN")
        card.find_element(By.CSS_SELECTOR, ".refform button").click()
        WebDriverWait(d, 30).until(lambda _: card.get_attribute("data-draw") == "done")
        assert figures() == ["mol read differs", "mol reference"]
        WebDriverWait(d, 10).until(lambda _: drawn("reference"))
        caption = card.find_element(By.CSS_SELECTOR, "figure.read figcaption").text
        assert "differs" in caption and "1 atom" in caption
        chips = card.find_elements(By.CSS_SELECTOR, ".tok")
        ActionChains(d).move_to_element(chips[0]).perform()  # attention still works
        assert card.get_attribute("data-active-token") == "0"
        d.save_screenshot(str(tmp_path / "serve_molecule.png"))

        field.clear()
        field.send_keys("<img src=x onerror=alert(1)>")
        card.find_element(By.CSS_SELECTOR, ".refform button").click()
        WebDriverWait(d, 30).until(lambda _: card.get_attribute("data-draw") == "error")
        problem = card.find_element(By.CSS_SELECTOR, ".refform + .problem").text
        assert problem.startswith("bad_reference:") and "<img src=x" in problem
        assert not d.find_elements(By.CSS_SELECTOR, "img[src='x']")
        assert figures() == ["mol read differs", "mol reference"]  # the last good drawing
    finally:
        d.quit()
