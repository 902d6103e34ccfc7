"""Sine/cosine codes of positions: smooth, distinct starting points for position embeddings."""

from __future__ import annotations

import math

import torch

__all__ = ["sincos_codes", "patch_grid_codes"]


def sincos_codes(positions: torch.Tensor, dim: int, min_wavelength: float, max_wavelength: float) -> torch.Tensor:
    """Sine/cosine codes of 1-D positions, ``dim`` values each (``dim / 2`` geometric wavelengths).

    Args:
        positions: positions in any unit, shape ``(n,)``.
        dim: even code width.
        min_wavelength / max_wavelength: shortest and longest period, in the unit of ``positions``.

    Returns:
        ``(n, dim)`` float32, values in [-1, 1]: sines in the first half, cosines in the second.
    """
    if dim % 2:
        raise ValueError(f"sincos_codes needs an even width, got {dim}")
    wavelengths = torch.logspace(math.log10(min_wavelength), math.log10(max_wavelength), dim // 2,
                                 device=positions.device)
    angles = 2 * math.pi * positions.float()[:, None] / wavelengths[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def patch_grid_codes(grid_size: int, dim: int) -> torch.Tensor:
    """Codes of the patch centres of a ``grid_size x grid_size`` image on the 0-100 box grid.

    The box grid is the unit of the coordinate tokens ``<0>``..``<100>``, so the wavelengths
    (4 to 400 grid units) tell apart neighbouring patches and still span the whole image.

    Returns:
        ``(grid_size, dim)`` float32: row ``i`` codes the centre of column (or row) ``i``.
    """
    centres = (torch.arange(grid_size, dtype=torch.float32) + 0.5) * 100.0 / grid_size
    return sincos_codes(centres, dim, 4.0, 400.0)
