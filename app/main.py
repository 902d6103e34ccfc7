"""Command line entry: ``python app.py [--model DIR] [--quant 4bit|8bit|none] [--raster PATH] ...``.

Binds 127.0.0.1 by default, no share link; ``--host 0.0.0.0`` exposes it explicitly. The
model loads in a background thread so the page is up at once; the Model tab shows progress,
the quantization actually used and any fallback notice.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from app.handlers import open_default_raster
from app.layout import CSS, build_demo
from app.server import PreviewStore, build_server
from app.settings import DEFAULT_MODEL_DIR, DEFAULT_RASTER, AppSettings
from app.state import ModelHolder, ModelUnavailableError

__all__ = ["parse_args", "main", "create_app"]

logger = logging.getLogger(__name__)


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError(f"--auth {text!r}: expected user:password")
    return user, password


def parse_args(argv: Sequence[str] | None = None) -> AppSettings:
    """Settings from the command line."""
    parser = argparse.ArgumentParser(prog="app.py", description="SkyMoE Geo: the analyst's map app.")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="checkpoint folder (default: %(default)s)")
    parser.add_argument("--no-model", action="store_true", help="start without loading a model")
    parser.add_argument("--quant", choices=["4bit", "8bit", "none"], default="4bit")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--raster", type=Path, default=DEFAULT_RASTER, help="GeoTIFF shown at start")
    parser.add_argument("--no-raster", action="store_true", help="start with an empty map")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: local only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", type=_auth, default=None, help="require a login user:password")
    parser.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload accepted (MiB)")
    parser.add_argument("--allow-dir", type=Path, action="append", default=[],
                        help="server folder whose rasters may be opened by path (repeatable; assets/ always)")
    args = parser.parse_args(argv)
    if args.max_upload_mb <= 0:
        parser.error(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    allowed = tuple(dict.fromkeys([AppSettings().allowed_dirs[0], *(d.resolve() for d in args.allow_dir)]))
    if args.raster is not None and not args.no_raster:
        allowed = tuple(dict.fromkeys([*allowed, args.raster.resolve().parent]))
    return AppSettings(model_dir=None if args.no_model else args.model, quant=args.quant, device=args.device,
                       raster=None if args.no_raster else args.raster, host=args.host, port=args.port, auth=args.auth,
                       max_upload_mb=args.max_upload_mb, allowed_dirs=allowed)


def _load_in_background(holder: ModelHolder, settings: AppSettings) -> threading.Thread:
    def work() -> None:
        try:
            holder.load(settings.model_dir, quant=settings.quant, device=settings.device)
        except ModelUnavailableError as err:
            logger.warning("%s", err)
        except Exception:  # the app keeps running; the Model tab shows the error
            logger.exception("loading %s failed", settings.model_dir)

    thread = threading.Thread(target=work, name="skymoe-model-load", daemon=True)
    thread.start()
    return thread


def create_app(settings: AppSettings):
    """The FastAPI app (Gradio UI + our routes) for ``settings``; starts the model load."""
    holder, previews = ModelHolder(), PreviewStore()
    if settings.model_dir is not None:
        _load_in_background(holder, settings)
    initial, info = open_default_raster(settings, previews)
    demo = build_demo(settings, holder, previews, initial, info)
    demo.queue(default_concurrency_limit=4)
    return build_server(demo, settings, previews, css=CSS)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve the app until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    settings = parse_args(argv)
    server = create_app(settings)
    logger.info("SkyMoE Geo ready in %.1f s on http://%s:%d (model loading in the background)",
                time.perf_counter() - start, settings.host, settings.port)
    uvicorn.run(server, host=settings.host, port=settings.port, log_level="warning")
