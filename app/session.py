"""Per-user session data kept in ``gr.State`` (one value per browser tab / API client)."""

from __future__ import annotations

import dataclasses
from typing import Any

from app.map_component import MapState

__all__ = ["Session"]


@dataclasses.dataclass(frozen=True)
class Session:
    """What one user has open.

    Attributes:
        raster: ``tiling.Raster`` of the opened file, or None.
        name: file name shown to the user.
        grid: the ``tiling.TileGrid`` drawn on the map (tile ids in the UI index it).
        result: last ``tiling.SceneResult`` (complete, or partial after Stop), or None.
        map: what the map shows.
    """

    raster: Any = None
    name: str = ""
    grid: Any = None
    result: Any = None
    map: MapState = dataclasses.field(default_factory=MapState)

    def replace(self, **changes: Any) -> Session:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)
