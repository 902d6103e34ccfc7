"""Writing results: GeoJSON (EPSG:4326), GeoPackage (native CRS), CSV, HTML map.

Every writer goes through :func:`_atomic_write`: the file is written to a
temporary name in the destination folder and renamed over the target only
when complete, so a failure never leaves a half-written file.

CSV content: one row per detection (``label, score, task, query, tile_id,
area_m2`` and the centroid as ``lon, lat``, or ``x_px, y_px`` in pixel mode)
when there are detections; otherwise the counts (``label, count``) when there
are any; otherwise the per-tile answers (``tile_id, answer, confidence, text``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geopandas as gpd

from tiling.analysis import DETECTION_COLUMNS, SceneResult
from tiling.errors import ExportError, MissingCRSError
from tiling.georef import to_geojson_lonlat
from tiling.raster import Raster

__all__ = ["EXPORT_FORMATS", "check_export_path", "export", "export_html_map"]

logger = logging.getLogger(__name__)

#: Extensions :func:`export` writes.
EXPORT_FORMATS = (".geojson", ".gpkg", ".csv")


def check_export_path(path: str | Path) -> None:
    """Raise :class:`ExportError` now if ``path`` cannot be written by :func:`export` or
    :func:`export_html_map` (unknown extension, missing folder), so a caller can refuse it before
    a long analysis instead of after it."""
    path = Path(path)
    _known_suffix(path, (*EXPORT_FORMATS, ".html"))
    _existing_folder(path)


def _known_suffix(path: Path, formats: tuple[str, ...]) -> str:
    """``path``'s extension, lower case; :class:`ExportError` when it is not one of ``formats``."""
    suffix = path.suffix.lower()
    if suffix not in formats:
        raise ExportError(f"cannot export to {path.name!r}: unknown extension {suffix!r}; use one of {formats}")
    return suffix


def export(result: SceneResult, path: str | Path) -> Path:
    """Write ``result`` in the format given by the extension of ``path``.

    Args:
        result: From :func:`tiling.analyze`.
        path: ``*.geojson`` (EPSG:4326, RFC 7946), ``*.gpkg`` (native CRS,
            layer ``detections``) or ``*.csv`` (module docstring).

    Returns:
        The written path.

    Raises:
        ExportError: Unknown extension, missing folder, GeoJSON of a pixel-mode
            result, or a write failure (nothing is left behind).
    """
    path = Path(path)
    writers: dict[str, Callable[[Path], None]] = {
        ".geojson": lambda tmp: _write_geojson(result, tmp),
        ".gpkg": lambda tmp: _write_gpkg(result, tmp),
        ".csv": lambda tmp: _write_csv(result, tmp),
    }
    _atomic_write(path, writers[_known_suffix(path, EXPORT_FORMATS)])
    logger.info("exported %d detections to %s", len(result.detections), path)
    return path


def _existing_folder(path: Path) -> Path:
    """The folder ``path`` goes into; :class:`ExportError` when it does not exist."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ExportError(f"cannot write {path}: the folder {folder} does not exist; create it first")
    return folder


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``."""
    folder = _existing_folder(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # some drivers (GPKG) refuse to write over an existing file
    try:
        write(tmp)
        os.replace(tmp, path)
    except ExportError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:  # any writer failure: clean up and report with the path
        tmp.unlink(missing_ok=True)
        raise ExportError(f"writing {path} failed ({type(exc).__name__}: {exc}); nothing was written") from exc


def _write_geojson(result: SceneResult, tmp: Path) -> None:
    if result.crs is None:
        raise ExportError("a pixel-mode result has no CRS, so it cannot be GeoJSON (lon/lat by RFC 7946); "
                          "export .gpkg or .csv instead")
    collection = to_geojson_lonlat(result.detections)
    tmp.write_text(json.dumps(collection), encoding="utf-8")


def _write_gpkg(result: SceneResult, tmp: Path) -> None:
    frame = result.detections
    kwargs: dict[str, Any] = {}
    if frame.empty:
        kwargs["geometry_type"] = "Polygon"  # an empty layer still needs a geometry type
    frame.to_file(tmp, driver="GPKG", layer="detections", engine="pyogrio", **kwargs)


def _write_csv(result: SceneResult, tmp: Path) -> None:
    frame = result.detections
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        if len(frame):
            _detection_rows(writer, frame)
        elif result.counts:
            writer.writerow(["label", "count"])
            writer.writerows(sorted(result.counts.items()))
        else:
            writer.writerow(["tile_id", "answer", "confidence", "text"])
            writer.writerows((a.tile_id, a.answer, f"{a.confidence:.4f}", a.text) for a in result.tile_answers)


def _detection_rows(writer: Any, frame: gpd.GeoDataFrame) -> None:
    """One CSV row per detection with its centroid (lon/lat, or pixels without CRS)."""
    centroids = frame.geometry.centroid
    if frame.crs is not None:
        centroids = centroids.to_crs("EPSG:4326")
        names = ["lon", "lat"]
    else:
        names = ["x_px", "y_px"]
    writer.writerow(DETECTION_COLUMNS + names)
    for row, point in zip(frame[DETECTION_COLUMNS].itertuples(index=False), centroids):
        writer.writerow([*row, f"{point.x:.8f}", f"{point.y:.8f}"])


def export_html_map(result: SceneResult, raster: Raster, path: str | Path) -> Path:
    """A standalone folium (Leaflet) HTML map: raster preview, detections and the scene answer.

    No online basemap is required: the preview is embedded; an OpenStreetMap
    layer is offered as an optional layer.

    Raises:
        ExportError: Pixel-mode result, missing folder, or write failure.
    """
    import base64
    import html

    import folium

    from tiling.preview import render_preview

    path = Path(path)
    try:
        preview = render_preview(raster, max_size=1024)
    except MissingCRSError as exc:
        raise ExportError(f"cannot make an HTML map: {exc}") from exc
    west, south, east, north = preview.bounds_lonlat
    fmap = folium.Map(location=[(south + north) / 2, (west + east) / 2], tiles=None, control_scale=True)
    folium.TileLayer("OpenStreetMap", name="OpenStreetMap (online)", show=False).add_to(fmap)
    png = "data:image/png;base64," + base64.b64encode(preview.png_bytes).decode("ascii")
    folium.raster_layers.ImageOverlay(png, bounds=[[south, west], [north, east]], name="raster").add_to(fmap)
    if len(result.detections):
        folium.GeoJson(to_geojson_lonlat(result.detections), name="detections",
                       tooltip=folium.GeoJsonTooltip(fields=["label", "score", "tile_id"])).add_to(fmap)
    if result.scene_answer:
        fmap.get_root().html.add_child(folium.Element(f"<p><b>{html.escape(result.scene_answer)}</b></p>"))
    folium.LayerControl().add_to(fmap)
    fmap.fit_bounds([[south, west], [north, east]])
    _atomic_write(path, lambda tmp: fmap.save(str(tmp)))
    return path
