"""Batched tile reading with a background read-ahead thread and bounded memory.

The reader thread opens its own dataset handle (rasterio handles are not
shared between threads), reads the next batch while the model works on the
current one, and hands batches over a queue of ``prefetch`` slots. At most
``prefetch + 2`` batches exist at once; the whole raster is never read.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from tiling.errors import RasterOpenError
from tiling.raster import Raster, stretch_to_uint8
from tiling.windows import Tile

__all__ = ["TileBatch", "READER_CACHE_MB", "read_tile", "read_batch", "iter_tile_batches"]

logger = logging.getLogger(__name__)

#: GDAL block cache (MB) while reading tiles: enough for one row of tiles of
#: a wide raster, small enough to keep the process well under 1 GB.
READER_CACHE_MB = 256

_POLL_S = 0.1


@dataclass(frozen=True)
class TileBatch:
    """Stretched tiles ready for the model.

    Attributes:
        tiles: The batch's tiles.
        images: ``(batch, tile_px, tile_px, 3)`` uint8 RGB, nodata and padding 0.
        valid: ``(batch, tile_px, tile_px)`` bool, True where the raster has
            valid data (False on nodata and on padding past the raster edge).
        read_s: Seconds spent reading and stretching this batch.
    """

    tiles: list[Tile]
    images: np.ndarray
    valid: np.ndarray
    read_s: float


def read_tile(ds, raster: Raster, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """Read one tile, stretch it with the raster's global limits, pad to full size.

    Args:
        ds: An open rasterio dataset of ``raster.path``.
        raster: The raster description (bands, stretch).
        tile: The window; parts past the raster edge are padded.

    Returns:
        ``(image, valid)``: ``(tile_px, tile_px, 3)`` uint8 and ``(tile_px, tile_px)`` bool.
    """
    c0, r0 = tile.col_off_px, tile.row_off_px
    c1, r1 = min(c0 + tile.width_px, raster.width), min(r0 + tile.height_px, raster.height)
    window = Window(c0, r0, c1 - c0, r1 - r0)
    data = ds.read(list(raster.read_indexes), window=window)  # (bands_read, rows, cols)
    order = [raster.read_indexes.index(b) for b in raster.band_indexes]
    data = data[order]  # (3, rows, cols)
    valid_part = ds.dataset_mask(window=window) > 0 if raster.has_mask else np.ones(data.shape[1:], bool)
    if data.dtype.kind == "f":
        valid_part &= ~np.isnan(data).any(axis=0)
    rgb_part = stretch_to_uint8(data, raster.lows, raster.highs)
    rgb_part[~valid_part] = 0
    image = np.zeros((tile.height_px, tile.width_px, 3), np.uint8)
    valid = np.zeros((tile.height_px, tile.width_px), bool)
    image[: r1 - r0, : c1 - c0] = rgb_part
    valid[: r1 - r0, : c1 - c0] = valid_part
    return image, valid


def read_batch(ds, raster: Raster, tiles: Sequence[Tile]) -> TileBatch:
    """Read and stretch several tiles into one :class:`TileBatch`.

    Raises:
        RasterOpenError: A tile's pixels cannot be read (truncated or corrupt file).
    """
    start = time.perf_counter()
    images, valids = [], []
    for tile in tiles:
        try:
            image, valid = read_tile(ds, raster, tile)
        except RasterioError as exc:
            raise RasterOpenError(
                f"reading tile {tile.tile_id} (cols {tile.col_off_px}.., rows {tile.row_off_px}..) of "
                f"{raster.path} failed ({exc}); the file may be truncated or corrupt"
            ) from exc
        images.append(image)
        valids.append(valid)
    return TileBatch(list(tiles), np.stack(images), np.stack(valids), time.perf_counter() - start)


class _Done:
    """End-of-stream marker."""


def iter_tile_batches(
    raster: Raster, tiles: Sequence[Tile], batch_size: int = 8, prefetch: int = 2
) -> Iterator[TileBatch]:
    """Yield batches of tiles, read ahead by a background thread.

    Closing the generator (or leaving the ``for`` loop) stops the thread and
    frees its batches.

    Args:
        raster: The raster description.
        tiles: Tiles in reading order.
        batch_size: Tiles per batch (>= 1).
        prefetch: Batches read ahead (queue slots, >= 1).

    Yields:
        One :class:`TileBatch` per ``batch_size`` tiles.

    Raises:
        RasterOpenError: From the reader thread, re-raised here.
    """
    slots: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    worker = threading.Thread(
        target=_read_worker, args=(raster, list(tiles), max(1, batch_size), slots, stop),
        name="tiling-read-ahead", daemon=True,
    )
    worker.start()
    try:
        while True:
            item = slots.get()
            if isinstance(item, _Done):
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def _read_worker(raster: Raster, tiles: list[Tile], batch_size: int, slots: queue.Queue,
                 stop: threading.Event) -> None:
    """Thread body: read batches into ``slots`` until done or ``stop``."""
    try:
        with rasterio.Env(GDAL_CACHEMAX=READER_CACHE_MB), rasterio.open(raster.path) as ds:
            for i in range(0, len(tiles), batch_size):
                if stop.is_set() or not _put(slots, read_batch(ds, raster, tiles[i : i + batch_size]), stop):
                    return
    except Exception as exc:  # handed over and re-raised in the consumer, never swallowed
        if isinstance(exc, RasterioError):
            exc = RasterOpenError(f"cannot read {raster.path} ({exc}); is the file complete?")
        _put(slots, exc, stop)
        return
    _put(slots, _Done(), stop)


def _put(slots: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; True when it was put."""
    while not stop.is_set():
        try:
            slots.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False
