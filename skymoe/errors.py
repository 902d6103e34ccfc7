"""Exceptions and warnings raised by :mod:`skymoe`.

Every message names the offending file or value and says what to do about it.
"""

from __future__ import annotations

__all__ = ["SkyMoEError", "CheckpointError", "SkyMoEConfigError", "SkyMoELoadWarning"]


class SkyMoEError(Exception):
    """Base class of every error :mod:`skymoe` raises on purpose."""


class CheckpointError(SkyMoEError):
    """A model folder is missing, incomplete, pickle-only or not a SkyMoE/LLaVA checkpoint."""


class SkyMoEConfigError(SkyMoEError, ValueError):
    """A :class:`~skymoe.configuration.SkyMoEConfig` field is out of range or inconsistent."""


class SkyMoELoadWarning(UserWarning):
    """A requested loading option could not be honoured and a fallback was used instead."""
