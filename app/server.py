"""The app's own HTTP routes (Leaflet's files, our map CSS, raster previews) around Gradio.

Leaflet comes from the installed ``xstatic-leaflet`` package, so the map works offline.
Previews are PNG bytes kept in memory under an unguessable key (sha256 of the bytes).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
from pathlib import Path

import fastapi
import gradio as gr
import xstatic.pkg.leaflet as xstatic_leaflet
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from app.map_component import LEAFLET_ROUTE, STATIC_DIR, STATIC_ROUTE
from app.settings import AppSettings

__all__ = ["PreviewStore", "PREVIEW_ROUTE", "build_server"]

logger = logging.getLogger(__name__)

PREVIEW_ROUTE = "/skymoe/preview"


class PreviewStore:
    """A bounded in-memory store of preview PNGs, shared by all sessions (thread-safe).

    Args:
        capacity: how many previews to keep; the least recently added go first.
    """

    def __init__(self, capacity: int = 32) -> None:
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def put(self, png_bytes: bytes) -> str:
        """Store ``png_bytes``; returns the URL path that serves them."""
        key = hashlib.sha256(png_bytes).hexdigest()[:32]
        with self._lock:
            self._items[key] = png_bytes
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return f"{PREVIEW_ROUTE}/{key}.png"

    def get(self, key: str) -> bytes | None:
        """The PNG stored under ``key``, or None."""
        with self._lock:
            return self._items.get(key)


def _leaflet_dir() -> Path:
    """Folder holding leaflet.js / leaflet.css in the installed xstatic package."""
    base = Path(xstatic_leaflet.BASE_DIR)
    if not (base / "leaflet.js").is_file():
        raise FileNotFoundError(
            f"leaflet.js not found in {base}; reinstall it with `pip install xstatic-leaflet`"
        )
    return base


def build_server(demo: gr.Blocks, settings: AppSettings, previews: PreviewStore, css: str = "") -> fastapi.FastAPI:
    """A FastAPI app serving our routes and, at ``/``, the Gradio app ``demo``.

    Upload size and optional login are applied by Gradio. No server folder is exposed for
    download: rasters opened by path are read by the handlers, not served.
    """
    server = fastapi.FastAPI(title="SkyMoE Geo", docs_url=None, redoc_url=None, openapi_url=None)
    server.mount(LEAFLET_ROUTE, StaticFiles(directory=_leaflet_dir()), name="leaflet")
    server.mount(STATIC_ROUTE, StaticFiles(directory=STATIC_DIR), name="skymoe-static")

    @server.get(PREVIEW_ROUTE + "/{key}.png")
    def preview(key: str) -> Response:
        png = previews.get(key)
        if png is None:
            raise fastapi.HTTPException(status_code=404, detail="preview expired; load the raster again")
        return Response(content=png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    return gr.mount_gradio_app(
        server,
        demo,
        path="/",
        auth=settings.auth,
        max_file_size=settings.max_upload_bytes,
        show_error=True,
        footer_links=["api", "settings"],
        css=css,
    )
