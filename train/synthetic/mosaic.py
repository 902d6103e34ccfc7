"""Large georeferenced synthetic mosaics: several scene types across one GeoTIFF, with ground truth.

The raster is a grid of ``cell_px`` cells separated by a continuous road grid; each
cell holds one generated scene block (``build_scene`` at the mosaic's GSD) of the
scene class of its district (Voronoi districts over the cells, so several types
form contiguous areas). Cars drive on the road grid. One sun lights the whole
mosaic. A corner collar is nodata (internal mask), as in a real orthophoto strip;
objects touching it are not drawn and not in the truth.

Regenerate the committed sample (4096 x 4096 px, 0.4 m, EPSG:32618)::

    python -m train.synthetic.mosaic --out assets/sample_scene.tif --seed 7

which also writes ``assets/sample_scene_objects.geojson`` (polygons in the raster
CRS, one feature per object with ``label``, ``colour``, ``size``, ``scene_class``,
``orientation_deg`` (image frame, clockwise from east) and ``box_px``).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine, from_origin

from train.annotations import AnnotatedImage, ObjectAnnotation
from train.synthetic.classes import SCENE_CLASSES
from train.synthetic.dataset import sample_seed
from train.synthetic.graph import PlacedObject, SceneGraph
from train.synthetic.layout import GROUNDS, Zone, dashes
from train.synthetic.render import render_scene, texture
from train.synthetic.scene import Placer, build_scene, object_annotation

__all__ = ["Mosaic", "build_mosaic", "write_mosaic", "objects_geojson", "main"]

logger = logging.getLogger(__name__)


@dataclass
class Mosaic:
    """A rendered mosaic and its truth.

    Attributes:
        image: ``(height, width, 3)`` uint8 RGB (0 where invalid).
        valid: ``(height, width)`` bool, False in the nodata collar.
        transform: pixel -> CRS affine (pixel corners).
        crs: raster CRS.
        gsd_m: metres per pixel.
        annotation: objects in mosaic pixels (``image_path`` empty until written).
        object_scenes: scene class of the block (or ``"road"``) of each object.
        cell_scenes: ``(rows, cols)`` scene class name of each cell.
    """

    image: np.ndarray
    valid: np.ndarray
    transform: Affine
    crs: CRS
    gsd_m: float
    annotation: AnnotatedImage
    object_scenes: list[str]
    cell_scenes: np.ndarray


def _districts(rng: np.random.Generator, n_cells: int, n_districts: int) -> np.ndarray:
    """``(n_cells, n_cells)`` scene names: each cell takes the class of its nearest district centre."""
    names = list(rng.permutation(sorted(SCENE_CLASSES)))[:n_districts]
    centres = rng.uniform(0, n_cells, (n_districts, 2))
    rr, cc = np.mgrid[0:n_cells, 0:n_cells] + 0.5
    d = (rr[..., None] - centres[:, 0]) ** 2 + (cc[..., None] - centres[:, 1]) ** 2
    return np.array(names, dtype=object)[d.argmin(axis=-1)]


def _road_grid(rng: np.random.Generator, ground: np.ndarray, cell_px: int, road_px: int,
               gsd_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Paint the road grid on every cell boundary; return ``(road mask, lane mask)`` (H, W) bool."""
    size = ground.shape[0]
    road = np.zeros((size, size), bool)
    lanes = np.zeros((size, size), bool)
    half, q = road_px // 2, max(1, road_px // 10)
    for c in range(0, size + 1, cell_px):
        lo, hi = max(0, c - half), min(size, c + half)
        road[lo:hi, :] = True
        road[:, lo:hi] = True
        for lane in (c - road_px // 4, c + road_px // 4):
            if q < lane < size - q:
                lanes[lane - q:lane + q, :] = True
                lanes[:, lane - q:lane + q] = True
    cross = np.zeros((size, size), bool)
    for c in range(0, size + 1, cell_px):
        for d in range(0, size + 1, cell_px):
            cross[max(0, c - road_px):c + road_px, max(0, d - road_px):d + road_px] = True
    asphalt = texture(rng, size, size, GROUNDS["asphalt"], 7)
    np.copyto(ground, asphalt, where=road[..., None])
    for c in range(cell_px, size, cell_px):
        dashes(ground, (0, c), (size, c), (222, 222, 210), int(3 / gsd_m))
        dashes(ground, (c, 0), (c, size), (222, 222, 210), int(3 / gsd_m))
    return road, lanes & ~cross


def _road_cars(rng: np.random.Generator, ground: np.ndarray, cell_px: int, road_px: int, gsd_m: float,
               difficulty: float) -> list[PlacedObject]:
    """Paint the road grid and place about three cars per cell in its lanes (heading along the road)."""
    size = ground.shape[0]
    road, lanes = _road_grid(rng, ground, cell_px, road_px, gsd_m)
    near_row = np.abs(np.arange(size)[:, None] % cell_px - cell_px / 2) > cell_px / 2 - road_px
    h_lanes = Zone(lanes & near_row, keep_out=~road, angle=0.0, turns=(0.0, 180.0), jitter_deg=1.0)
    v_lanes = Zone(lanes & ~h_lanes.centres, keep_out=~road, angle=90.0, turns=(0.0, 180.0), jitter_deg=1.0)
    placer = Placer(rng, size, size, gsd_m, difficulty)
    placer.place("car", [h_lanes, v_lanes], 3 * (size // cell_px) ** 2)
    return placer.objects


def _collar(size: int) -> np.ndarray:
    """Valid-data mask: a triangular nodata collar in the top-right and bottom-left corners."""
    rr, cc = np.mgrid[0:size, 0:size]
    return ~((cc - rr > 0.72 * size) | (rr - cc > 0.85 * size))


def _touches_invalid(o: PlacedObject, valid: np.ndarray) -> bool:
    x1, y1, x2, y2 = (int(v) for v in o.box_px)
    h, w = valid.shape
    return not valid[max(0, y1):min(h, y2 + 1), max(0, x1):min(w, x2 + 1)].all()


def build_mosaic(seed: int = 7, size_px: int = 4096, cell_px: int = 512, gsd_m: float = 0.4,
                 road_m: float = 10.0, crs: str = "EPSG:32618",
                 origin_crs: tuple[float, float] = (583_000.0, 4_507_000.0), districts: int = 6,
                 difficulty: float = 0.6) -> Mosaic:
    """Compose and render a mosaic (see the module docstring).

    Args:
        seed: mosaic seed.
        size_px: raster width and height, a multiple of ``cell_px``.
        cell_px: cell pitch (one scene block plus half a road on each side).
        gsd_m: metres per pixel.
        road_m: road width in metres.
        crs: projected CRS of the raster (metres).
        origin_crs: ``(x, y)`` of the raster's top-left corner in ``crs``.
        districts: number of scene-class districts (<= 9).
        difficulty: scene density of the blocks.

    Raises:
        ValueError: sizes that do not tile, or a non-projected CRS.
    """
    if size_px % cell_px or cell_px < 256:
        raise ValueError(f"size_px ({size_px}) must be a multiple of cell_px ({cell_px}) and cell_px >= 256")
    crs_obj = CRS.from_user_input(crs)
    if not crs_obj.is_projected:
        raise ValueError(f"crs must be projected (metres), got {crs!r}")
    rng = np.random.default_rng(seed)
    n = size_px // cell_px
    road_px = int(round(road_m / gsd_m))
    block_px = cell_px - road_px
    cell_scenes = _districts(rng, n, min(districts, len(SCENE_CLASSES)))
    ground = np.zeros((size_px, size_px, 3), np.float32)
    objects: list[PlacedObject] = []
    scenes: list[str] = []
    for r in range(n):
        for c in range(n):
            block = build_scene(sample_seed(seed, r * n + c), cell_scenes[r, c], block_px, gsd_m, difficulty)
            y0, x0 = r * cell_px + road_px // 2, c * cell_px + road_px // 2
            ground[y0:y0 + block_px, x0:x0 + block_px] = block.ground
            objects += [replace(o, cx_px=o.cx_px + x0, cy_px=o.cy_px + y0) for o in block.objects]
            scenes += [block.scene_class] * len(block.objects)
    cars = _road_cars(rng, ground, cell_px, road_px, gsd_m, difficulty)
    objects += cars
    scenes += ["road"] * len(cars)
    valid = _collar(size_px)
    keep = [i for i, o in enumerate(objects) if not _touches_invalid(o, valid)]
    graph = SceneGraph("mosaic", size_px, size_px, gsd_m, ground, [objects[i] for i in keep],
                       sun_azimuth_deg=float(rng.uniform(20, 70)), shadow_per_m=0.8,
                       render_seed=int(rng.integers(2**31)), difficulty=difficulty, seed=seed)
    image = render_scene(graph)
    image[~valid] = 0
    ann = AnnotatedImage("", size_px, size_px, [object_annotation(o, graph) for o in graph.objects], None,
                         source=f"synthetic-mosaic:seed={seed}:gsd={gsd_m}")
    transform = from_origin(origin_crs[0], origin_crs[1], gsd_m, gsd_m)
    return Mosaic(image, valid, transform, crs_obj, gsd_m, ann, [scenes[i] for i in keep], cell_scenes)


def objects_geojson(mosaic: Mosaic) -> dict:
    """The mosaic's objects as a GeoJSON FeatureCollection with polygons in the raster CRS (metres)."""
    t = mosaic.transform
    features = []
    for i, (o, scene) in enumerate(zip(mosaic.annotation.objects, mosaic.object_scenes)):
        ring = [[round(x, 2), round(y, 2)] for x, y in (t @ (px, py) for px, py in o.polygon_px)]
        features.append({"type": "Feature", "id": i,
                         "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
                         "properties": {"label": o.label, "colour": o.colour, "size": o.attributes["size"],
                                        "orientation_deg": o.attributes["orientation_deg"], "scene_class": scene,
                                        "box_px": [round(v, 1) for v in o.box_px]}})
    epsg = mosaic.crs.to_epsg()
    return {"type": "FeatureCollection",
            "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}},
            "features": features}


def write_mosaic(path: str | Path, mosaic: Mosaic, objects_path: str | Path | None = None,
                 quality: int = 88) -> Path:
    """Write ``mosaic`` as a tiled JPEG-in-TIFF GeoTIFF (YCbCr, internal nodata mask, overviews 2-16).

    Args:
        path: output ``.tif``.
        mosaic: from :func:`build_mosaic`.
        objects_path: GeoJSON of the objects; default ``<path stem>_objects.geojson`` beside the raster.
        quality: JPEG quality.

    Returns:
        The GeoJSON path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = mosaic.valid.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 3, "dtype": "uint8", "crs": mosaic.crs,
               "transform": mosaic.transform, "tiled": True, "blockxsize": 512, "blockysize": 512,
               "compress": "JPEG", "photometric": "YCBCR", "jpeg_quality": quality, "interleave": "pixel"}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(mosaic.image.transpose(2, 0, 1))
            dst.write_mask(mosaic.valid.astype(np.uint8) * 255)
            for b, name in enumerate(("red", "green", "blue"), start=1):
                dst.set_band_description(b, name)
            dst.update_tags(SOURCE="SkyMoE synthetic mosaic", GSD_M=str(mosaic.gsd_m))
        with rasterio.open(path, "r+") as dst:
            dst.build_overviews([2, 4, 8, 16], Resampling.average)
    objects_path = Path(objects_path) if objects_path else path.with_name(f"{path.stem}_objects.geojson")
    objects_path.write_text(json.dumps(objects_geojson(mosaic), separators=(",", ":")))
    logger.info("wrote %s (%d objects) and %s", path, len(mosaic.annotation.objects), objects_path)
    return objects_path


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m train.synthetic.mosaic --out assets/sample_scene.tif --seed 7``."""
    p = argparse.ArgumentParser(description="Write a synthetic georeferenced mosaic GeoTIFF and its objects GeoJSON.")
    p.add_argument("--out", type=Path, required=True, help="output GeoTIFF")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--size", type=int, default=4096, help="width = height in pixels (multiple of --cell)")
    p.add_argument("--cell", type=int, default=512, help="cell pitch in pixels")
    p.add_argument("--gsd", type=float, default=0.4, help="metres per pixel")
    p.add_argument("--crs", default="EPSG:32618")
    p.add_argument("--objects", type=Path, default=None, help="GeoJSON path (default beside the raster)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mosaic = build_mosaic(args.seed, args.size, args.cell, args.gsd, crs=args.crs)
    geojson = write_mosaic(args.out, mosaic, args.objects)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({args.size} x {args.size} px, {args.gsd} m, {args.crs}, {size_mb:.1f} MB), "
          f"{len(mosaic.annotation.objects)} objects -> {geojson}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
