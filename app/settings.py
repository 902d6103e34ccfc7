"""Launch settings of the app (parsed from the command line in app/main.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

__all__ = ["AppSettings", "REPO_ROOT", "DEFAULT_MODEL_DIR", "DEFAULT_RASTER", "DEMO_RECIPE_COMMAND"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "assets" / "skymoe-demo"
DEFAULT_RASTER = REPO_ROOT / "assets" / "sample_scene.tif"
DEMO_RECIPE_COMMAND = "python -m train.demo --out assets/skymoe-demo"

Quant = Literal["4bit", "8bit", "none"]


@dataclasses.dataclass(frozen=True)
class AppSettings:
    """How the app is launched.

    Attributes:
        model_dir: checkpoint folder loaded at start (None: start without a model).
        quant: quantization asked for; skymoe falls back (with a warning) where it cannot run.
        device: "auto", "cpu" or "cuda".
        raster: GeoTIFF shown at start (None or missing: start with an empty map).
        host: interface to bind; 127.0.0.1 unless the user exposes it explicitly.
        port: TCP port.
        auth: optional ``(user, password)`` for HTTP login.
        max_upload_mb: uploads larger than this many MiB are refused by the server.
        allowed_dirs: server folders whose rasters may be opened by path (absolute).
    """

    model_dir: Path | None = DEFAULT_MODEL_DIR
    quant: Quant = "4bit"
    device: str = "auto"
    raster: Path | None = DEFAULT_RASTER
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    max_upload_mb: float = 1024.0
    allowed_dirs: tuple[Path, ...] = (REPO_ROOT / "assets",)

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)
