"""Turn exceptions from handlers into messages a person understands (``gr.Error``).

Known input errors (tiling's ``TilingError`` family, skymoe's ``CheckpointError``, a missing
model, ``ValueError`` from prompt building) show their own message; anything else shows a short
notice pointing at the log, where the full traceback goes. No stack trace reaches the UI.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import gradio as gr
import skymoe
from tiling.errors import TilingError

from app.state import ModelUnavailableError

__all__ = ["user_facing", "friendly_error"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
_KNOWN = (TilingError, ModelUnavailableError, ValueError, FileNotFoundError)


def friendly_error(err: BaseException, action: str) -> gr.Error:
    """A ``gr.Error`` for ``err`` raised while doing ``action`` (e.g. "loading the raster")."""
    if isinstance(err, gr.Error):
        return err
    checkpoint_error = getattr(skymoe, "CheckpointError", ())
    if isinstance(err, _KNOWN) or (checkpoint_error and isinstance(err, checkpoint_error)):
        logger.info("%s failed: %s", action, err)
        return gr.Error(html.escape(str(err)), title=f"Problem while {action}", print_exception=False)
    logger.exception("unexpected error while %s", action)
    return gr.Error(
        f"Something went wrong while {action} ({type(err).__name__}: {html.escape(str(err))}). "
        "The full details are in the app's log.",
        title="Unexpected error",
        print_exception=False,
    )


def user_facing(action: str) -> Callable[[F], F]:
    """Decorator: errors of the handler (a function or a generator) become ``gr.Error``."""

    def decorate(fn: F) -> F:
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    yield from fn(*args, **kwargs)
                except Exception as err:
                    raise friendly_error(err, action) from err

            return gen_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                raise friendly_error(err, action) from err

        return wrapper  # type: ignore[return-value]

    return decorate
