"""Per-user session data kept in ``gr.State`` (one value per browser tab / API client)."""

from __future__ import annotations

import dataclasses
from typing import Any

from app.map_component import MapState

__all__ = ["Session", "ChatContext"]


@dataclasses.dataclass(frozen=True)
class ChatContext:
    """The conversation about one tile.

    Attributes:
        tile_id: the tile talked about (in the grid whose map key is ``grid_key``).
        grid_key: ``MapState.grid_key`` of that grid (a new grid starts a new conversation).
        prefix: ``skymoe.prefix.TilePrefix`` of the tile (its image prefix is encoded once).
        turns: earlier ``(user prompt, answer)`` turns, fed back to the model.
    """

    tile_id: int
    grid_key: str
    prefix: Any
    turns: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Session:
    """What one user has open.

    Attributes:
        raster: ``tiling.Raster`` of the opened file, or None.
        name: file name shown to the user.
        grid: the ``tiling.TileGrid`` drawn on the map (tile ids in the UI index it).
        result: last ``tiling.SceneResult`` (complete, or partial after Stop), or None.
        map: what the map shows.
        chat: the conversation about the selected tile, or None.
    """

    raster: Any = None
    name: str = ""
    grid: Any = None
    result: Any = None
    map: MapState = dataclasses.field(default_factory=MapState)
    chat: ChatContext | None = None

    def replace(self, **changes: Any) -> Session:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)
