"""Shared, process-wide state: the one loaded SkyMoE model behind a lock.

Per-user data (the opened raster, the last result) lives in ``gr.State`` (see
app/handlers.py); only the model is shared, so two users never load it twice.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import skymoe

from app.settings import DEFAULT_MODEL_DIR, DEMO_RECIPE_COMMAND

__all__ = ["ModelStatus", "ModelHolder", "ModelUnavailableError"]

logger = logging.getLogger(__name__)


class ModelUnavailableError(Exception):
    """No model is loaded (missing folder, failed load, or still loading)."""


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """What the Model tab shows.

    Attributes:
        path: checkpoint folder asked for (None: none asked for yet).
        quant: quantization asked for ("4bit", "8bit", "none").
        device: device asked for.
        loaded: True when a model is ready.
        loading: True while a load is under way.
        summary: ``skymoe.ModelSummary`` of the loaded model, or None.
        notices: load warnings (e.g. a 4-bit fallback) in words.
        error: why no model is loaded, in words, or "".
        load_seconds: wall time of the last successful load.
    """

    path: Path | None = None
    quant: str = "4bit"
    device: str = "auto"
    loaded: bool = False
    loading: bool = False
    summary: Any = None
    notices: tuple[str, ...] = ()
    error: str = ""
    load_seconds: float = 0.0


class ModelHolder:
    """The single model instance of the app; loads are serialised and runs share it.

    Loads are serialised by a lock; the previous model stays in place until a new one loaded.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._model: Any = None
        self._status = ModelStatus()

    @property
    def status(self) -> ModelStatus:
        """The current status (a snapshot)."""
        return self._status

    def load(self, path: Path | str, quant: str = "4bit", device: str = "auto") -> ModelStatus:
        """Load the checkpoint at ``path``, replacing the current model only on success.

        Raises:
            ModelUnavailableError: the folder is missing or is not a SkyMoE checkpoint; the
                message says what was wrong and what to do. The previous model stays loaded.
        """
        path = Path(path).expanduser()
        with self._lock:
            self._status = dataclasses.replace(self._status, loading=True)
            try:
                model, status = self._load_locked(path, quant, device)
            except Exception as err:
                known = isinstance(err, ModelUnavailableError)
                message = str(err) if known else f"Loading {path} failed ({type(err).__name__}: {err})."
                if not known:
                    logger.exception("loading %s failed", path)
                self._status = dataclasses.replace(self._status, loading=False, error=message,
                                                   path=self._status.path if self._model else path)
                if known:
                    raise
                raise ModelUnavailableError(message) from err
            self._model, self._status = model, status
            return status

    def _load_locked(self, path: Path, quant: str, device: str) -> tuple[Any, ModelStatus]:
        if not path.is_dir():
            hint = f" Make the demo model with `{DEMO_RECIPE_COMMAND}`." if path == DEFAULT_MODEL_DIR else ""
            raise ModelUnavailableError(f"Model folder not found: {path}.{hint}")
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", skymoe.SkyMoELoadWarning)
            try:
                loaded = skymoe.load_model(path, quant=quant, device=device)
            except (skymoe.CheckpointError, OSError, ValueError) as err:
                raise ModelUnavailableError(f"{path} is not a loadable SkyMoE checkpoint: {err}") from err
        notices = tuple(str(w.message) for w in caught if issubclass(w.category, skymoe.SkyMoELoadWarning))
        for notice in notices:
            logger.warning("model load: %s", notice)
        summary = skymoe.model_summary(loaded.model)
        seconds = time.perf_counter() - start
        logger.info("loaded %s (%s) in %.1f s", path, summary.quantization, seconds)
        status = ModelStatus(path=path, quant=quant, device=device, loaded=True, summary=summary,
                             notices=notices, load_seconds=seconds)
        return loaded, status

    def get(self) -> Any:
        """The loaded ``skymoe.LoadedModel`` (a reload later does not affect a run holding it).

        Runs take turns through the Gradio queue (one shared concurrency id, limit 1), so the
        model is not held across a generator's yields here.

        Raises:
            ModelUnavailableError: no model is loaded; the message says why and what to do.
        """
        with self._lock:
            if self._model is None:
                reason = self._status.error or "no model has been loaded yet"
                raise ModelUnavailableError(
                    f"No model is loaded ({reason}). Load a checkpoint folder in the Model tab."
                )
            return self._model
