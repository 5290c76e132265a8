"""The HTTP server: ``POST /v1/caption``, ``POST /v1/draw``, ``GET /health`` and ``GET /``
(a page to try the model), on FastAPI and uvicorn.

A request carries one or more images: multipart form data (field ``image``, repeatable)
or JSON (``{"image": "<base64>"}`` or ``{"images": ["<base64>", ...]}``). Each image is
checked and decoded with Pillow (:func:`~captioner.data.images.load_image`) off the event
loop, then decoded by the model in micro-batches (:class:`MicroBatcher`) shared by all
concurrent requests.

Responses are JSON. Success (200): ``{"model", "grid": [gh, gw], "results": [...]}`` with
per image ``image`` (its file name or ``images[i]``), ``text``, ``tokens``, ``token_ids``,
``score``, ``token_scores`` (T,) and ``attention`` (T, gh*gw), and, when the model reads
pictures cut to their ink (``decode.crop_margin``, ``serve --crop-margin``), ``view``: the
cut picture it read, as a PNG data URL (the attention lies over it, not the upload). In a
request with several images, an unusable one gets ``{"image", "error": {"code",
"message"}}`` in its place and the others their results. When no image of the request is
usable, or the request itself is wrong, the status is 4xx with ``{"error": {"code",
"message"}}``: 400 (no ``image`` field, bad JSON or base64, empty, truncated or unreadable
image, too many images), 413 (body over ``max_body_bytes``, or an image over
``max_pixels``: decompression bombs are refused from the header), 415 (not an image, or an
unsupported content type). The server keeps serving after any of them.

Molecules: when the model reads SMILES (a run whose tokenizer is ``smiles`` or ``char``;
for an export, which does not record its tokenizer, any text that looks like SMILES),
each result also has ``molecule``: the RDKit drawing of what was read, as
:meth:`captioner.viz.molecules.MoleculeDiff.to_json` (``prediction`` with ``valid``,
``canonical`` and ``svg``; ``note``). Caption models, and servers without RDKit, skip
this. ``POST /v1/draw`` takes JSON ``{"smiles": "...", "reference": "..."}`` (reference
optional) and returns the same structure with the atoms and bonds that differ
highlighted on both sides; 400 (``bad_json``, ``no_smiles``, ``bad_reference``,
``too_long``: over ``max_smiles_chars``, ``bad_smiles``: RDKit cannot parse it), 413
(body over ``max_draw_body_bytes``), 415 (not JSON), 501 (``no_rdkit``).

Example:
    >>> app = create_app(RunBackend("runs/demo"))          # doctest: +SKIP
    >>> serve(RunBackend("runs/demo"), port=8000)           # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile

from captioner.data.images import ImageError, ImageLimits, View, load_image, load_view
from captioner.serve.backends import CaptionBackend
from captioner.serve.batching import BatchingOptions, MicroBatcher
from captioner.viz.molecules import looks_like_smiles, molecule_diff_svg, rdkit_available
from captioner.viz.report import live_page_html


@dataclass(frozen=True)
class ServeOptions:
    """Limits, batching and molecule drawings of the server.

    Example:
        >>> ServeOptions().max_body_bytes, ServeOptions().max_images
        (20000000, 32)
        >>> ServeOptions().max_smiles_chars, ServeOptions().molecule_px
        (1000, 296)
    """

    max_body_bytes: int = 20_000_000
    max_images: int = 32
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    status_of: tuple[tuple[str, int], ...] = (
        ("too_large", 413), ("not_an_image", 415), ("empty", 400), ("truncated", 400),
        ("unreadable", 400))
    max_smiles_chars: int = 1000
    max_draw_body_bytes: int = 16_000
    molecule_px: int = 296


class ApiError(Exception):
    """A request the server refuses: HTTP status, a code and a message naming the
    problem."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"code": self.code, "message": self.message}},
                            status_code=self.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"the body has {int(declared):,} bytes; the "
                       f"limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the body exceeds the limit of {limit:,} "
                           "bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_images(request: Request, body: bytes, max_images: int
                            ) -> list[tuple[str, bytes]]:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_images + 1,
                                                         max_fields=max_images + 16)
    except Exception as exc:  # noqa: BLE001 - the multipart parser's own errors
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed: {exc}"
                       ) from None
    parts = form.getlist("image")
    if not parts:
        fields = ", ".join(sorted(set(form.keys()))) or "none"
        raise ApiError(400, "no_image_field", "no form field named 'image' (fields sent: "
                       f"{fields}); send each image as a file in the field 'image'")
    images = []
    for i, part in enumerate(parts):
        if not isinstance(part, UploadFile):
            raise ApiError(400, "not_a_file", f"form field 'image' #{i} is text, not a file")
        images.append((part.filename or f"images[{i}]", await part.read()))
    return images


def _json_images(body: bytes) -> list[tuple[str, bytes]]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    if isinstance(payload, dict) and isinstance(payload.get("image"), str):
        items = [payload["image"]]
    elif isinstance(payload, dict) and isinstance(payload.get("images"), list):
        items = payload["images"]
    else:
        raise ApiError(400, "no_image_field", "JSON must be {\"image\": \"<base64>\"} or "
                       "{\"images\": [\"<base64>\", ...]}")
    images = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ApiError(400, "bad_base64", f"images[{i}] is not a base64 string")
        try:
            images.append((f"images[{i}]", base64.b64decode(item, validate=True)))
        except (binascii.Error, ValueError):
            raise ApiError(400, "bad_base64", f"images[{i}] is not valid base64") from None
    return images


async def request_images(request: Request, options: ServeOptions) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request, or :class:`ApiError`."""
    body = await read_body(request, options.max_body_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        images = await _multipart_images(request, body, options.max_images)
    elif kind == "application/json":
        images = _json_images(body)
    else:
        raise ApiError(415, "unsupported_content_type", f"content type {kind or 'none'!r}: "
                       "send multipart/form-data (field 'image') or application/json")
    if not images:
        raise ApiError(400, "no_image", "the request holds no image")
    if len(images) > options.max_images:
        raise ApiError(400, "too_many_images", f"{len(images)} images; at most "
                       f"{options.max_images} per request")
    return images


_DRAW_SHAPE = 'JSON must be {"smiles": "..."} with an optional "reference": "..."'


def _smiles_field(payload: dict[str, Any], key: str, limit: int) -> str | None:
    """``payload[key]`` stripped; None when absent, null or blank; :class:`ApiError` (400)
    when it is not a string or longer than ``limit`` characters."""
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        code = "no_smiles" if key == "smiles" else "bad_reference"
        raise ApiError(400, code, f"{key!r} must be a string, not {type(value).__name__}")
    text = value.strip()
    if len(text) > limit:
        raise ApiError(400, "too_long", f"{key!r} has {len(text):,} characters; the limit "
                       f"is {limit:,}")
    return text or None


async def draw_request(request: Request, options: ServeOptions) -> tuple[str, str | None]:
    """(smiles, reference or None) of a ``POST /v1/draw``, or :class:`ApiError`."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, "unsupported_content_type", f"content type {kind or 'none'!r}: "
                       "send application/json")
    body = await read_body(request, options.max_draw_body_bytes)
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "no_smiles", _DRAW_SHAPE)
    smiles = _smiles_field(payload, "smiles", options.max_smiles_chars)
    if smiles is None:
        raise ApiError(400, "no_smiles", f"no 'smiles' to draw; {_DRAW_SHAPE}")
    return smiles, _smiles_field(payload, "reference", options.max_smiles_chars)


@dataclass(frozen=True)
class Checked:
    """An image of a request, checked and decoded: the model's input ``pixels`` (S, S, 3)
    and, when the backend cuts pictures to their ink, the cut ``view`` it read (for the
    page to show under the attention)."""

    pixels: np.ndarray
    view: View | None = None


class CaptionService:
    """Checks images and hands them to the batcher, and draws molecules; one per
    server."""

    def __init__(self, backend: CaptionBackend, options: ServeOptions):
        self.backend = backend
        self.options = options
        self.batcher = MicroBatcher(backend.caption, options.batching)
        # pictures cut to their ink plus this margin before they are read (None: whole)
        self.crop_margin: float | None = getattr(backend, "crop_margin", None)
        self.rdkit = rdkit_available()
        kind = getattr(backend, "text_kind", "caption")
        # True: every text is SMILES; None: draw the texts that look like SMILES
        self.molecules: bool | None = (False if not self.rdkit or kind == "caption"
                                       else True if kind == "smiles" else None)

    def _drawable(self, text: str) -> bool:
        if self.molecules is None:
            return looks_like_smiles(text)
        return self.molecules and len(text) <= self.options.max_smiles_chars

    def _draw_results(self, results: list[dict[str, Any]]) -> None:
        """Add ``molecule`` (a plain drawing of what was read) to every SMILES result."""
        px = self.options.molecule_px
        for result in results:
            if "text" in result and self._drawable(result["text"]):
                result["molecule"] = molecule_diff_svg(result["text"], None, (px, px)).to_json()

    async def draw(self, smiles: str, reference: str | None) -> JSONResponse:
        """``POST /v1/draw``: ``smiles`` drawn against ``reference``, or :class:`ApiError`."""
        if not self.rdkit:
            raise ApiError(501, "no_rdkit", "drawing molecules needs RDKit on the server: "
                           "pip install rdkit")
        px = self.options.molecule_px
        diff = await asyncio.to_thread(molecule_diff_svg, smiles, reference, (px, px))
        if not diff.valid:
            raise ApiError(400, "bad_smiles", f"smiles {smiles!r} is not a valid molecule "
                           "(RDKit cannot parse it)")
        if diff.reference is not None and not diff.reference.valid:
            raise ApiError(400, "bad_reference", f"reference {reference!r} is not a valid "
                           "molecule (RDKit cannot parse it)")
        return JSONResponse(diff.to_json())

    def _pixels(self, name: str, data: bytes) -> Checked:
        try:
            if self.crop_margin is None:
                return Checked(load_image(data, self.backend.image_size,
                                          self.options.image_limits))
            view = load_view(data, self.crop_margin, self.options.image_limits)
            return Checked(view.resized(self.backend.image_size), view)
        except ImageError as exc:
            raise ImageError(name, exc.reason, exc.detail) from None

    async def caption(self, images: list[tuple[str, bytes]]) -> Response:
        checked: list[Checked | ImageError] = []
        for name, data in images:
            try:
                checked.append(await asyncio.to_thread(self._pixels, name, data))
            except ImageError as exc:
                checked.append(exc)
        good = [c.pixels for c in checked if isinstance(c, Checked)]
        if not good:
            return self._all_bad([c for c in checked if isinstance(c, ImageError)])
        decoded = iter(await self.batcher.submit(good))
        results = []
        for (name, _), item in zip(images, checked):
            if isinstance(item, ImageError):
                results.append({"image": name, "error": {"code": item.reason,
                                                         "message": str(item)}})
            else:
                result = {"image": name, **next(decoded)}
                if item.view is not None:  # the cut picture the attention lies over
                    result["view"] = item.view.png_data_url()
                results.append(result)
        if self.molecules is not False:
            await asyncio.to_thread(self._draw_results, results)
        body = {"model": self.backend.name, "grid": list(self.backend.grid_hw),
                "results": results}
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")  # writes the arrays directly

    def _all_bad(self, errors: list[ImageError]) -> JSONResponse:
        status = dict(self.options.status_of)
        codes = {e.reason for e in errors}
        code = codes.pop() if len(codes) == 1 else "bad_images"
        body = {"error": {"code": code, "message": "; ".join(str(e) for e in errors)},
                "results": [{"image": e.source, "error": {"code": e.reason, "message": str(e)}}
                            for e in errors]}
        return JSONResponse(body, status_code=status.get(code, 400))


def page_html(backend: CaptionBackend) -> str:
    """``GET /``: pick or drop images, see the caption, its score and each token's
    attention (the report page's cards and interaction, plus ``serve.js``)."""
    assets = resources.files("captioner.serve").joinpath("assets")
    form = assets.joinpath("form.html").read_text("utf-8")
    return live_page_html(f"captioner · {backend.name}", backend.grid_hw, form,
                          assets.joinpath("serve.css").read_text("utf-8"),
                          assets.joinpath("serve.js").read_text("utf-8"))


def create_app(backend: CaptionBackend, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI application serving ``backend``."""
    options = options or ServeOptions()
    service = CaptionService(backend, options)
    page = page_html(backend)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.batcher.start()
        yield
        await service.batcher.stop()

    app = FastAPI(title="captioner", lifespan=lifespan)
    app.state.service = service

    @app.get("/health")
    async def health() -> dict[str, Any]:
        b = options.batching
        return {"status": "ok", "model": backend.name, "grid": list(backend.grid_hw),
                "image_size": backend.image_size, "crop_margin": service.crop_margin,
                "batching": {"max_batch": b.max_batch, "window_ms": b.window_ms},
                "batches": {str(k): v for k, v in sorted(service.batcher.batch_sizes.items())},
                "molecules": {True: "every result", None: "results that look like SMILES",
                              False: "off"}[service.molecules],
                "draw": service.rdkit}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.post("/v1/caption")
    async def caption(request: Request) -> Response:
        try:
            return await service.caption(await request_images(request, options))
        except ApiError as exc:
            return exc.response()

    @app.post("/v1/draw")
    async def draw(request: Request) -> Response:
        try:
            return await service.draw(*await draw_request(request, options))
        except ApiError as exc:
            return exc.response()

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": {"code": "internal", "message":
                                       f"{type(exc).__name__}: {exc}"}}, status_code=500)

    return app


def serve(backend: CaptionBackend, host: str = "127.0.0.1", port: int = 8000,
          options: ServeOptions | None = None, access_log: bool = False) -> None:
    """Run the server until interrupted (one log line per request with ``access_log``)."""
    uvicorn.run(create_app(backend, options), host=host, port=port, log_level="info",
                access_log=access_log)
