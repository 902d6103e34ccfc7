"""Object tokens: the image as a few pooled context tokens plus the patches where objects are.

With ``SkyMoEConfig.object_tokens = K`` the language model does not read every patch of the
image grid. A per-class centre heatmap head (``SkyMoEModel.object_scorer``, one logit per patch
and object class, trained by Stage 0 of the demo recipe) marks where object centres lie; the
image becomes ``object_context_grid ** 2`` average-pooled context tokens (row-major, for the
scene and the caption) followed by the projected tokens of the K patches with the strongest
centre peaks, in row-major patch order. Slots no peak above :data:`PEAK_THRESHOLD` fills carry a
zero token. The train/README's oracle runs found the language model learns to find and copy
from a handful of object tokens but not from the full grid.

Patch frames: patches are numbered row-major from the top-left, ``index = row * side + column``.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["PEAK_THRESHOLD", "select_object_patches", "object_image_tokens"]

#: Centre probability a peak must pass to fill an object slot (the Stage 0 check's detection threshold).
PEAK_THRESHOLD = 0.3


def select_object_patches(centre_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` patches with the strongest centre peaks of each image.

    A peak is a patch whose probability for some class is the maximum of that class's 3 x 3
    neighbourhood (CenterNet's decoding); its strength is that probability. Patches are ranked
    peaks first (strongest first), then the other patches by their best probability, so there
    are always ``k`` of them; the chosen ones are returned in row-major order.

    Args:
        centre_logits: ``(images, side * side, classes)`` centre heatmap logits of a square grid.
        k: object slots per image, ``1 <= k <= side * side``.

    Returns:
        ``(patches, strength)``: ``(images, k)`` int64 patch indices, ascending, and the
        ``(images, k)`` float32 peak strength of each (0 where the patch is not a peak).
    """
    images, patches, classes = centre_logits.shape
    side = math.isqrt(patches)
    if patches != side * side:
        raise ValueError(f"centre_logits has {patches} patches per image, not a square grid")
    if not 1 <= k <= patches:
        raise ValueError(f"object_tokens must lie in [1, {patches}] for a {side} x {side} grid, got {k}")
    probs = torch.sigmoid(centre_logits.detach().float())  # (images, patches, classes)
    maps = probs.transpose(1, 2).reshape(images, classes, side, side)
    is_peak = maps == F.max_pool2d(maps, 3, stride=1, padding=1)
    peak = torch.where(is_peak, maps, torch.zeros_like(maps)).amax(dim=1).reshape(images, patches)
    best = probs.amax(dim=2)  # (images, patches)
    rank = torch.where(peak > 0, 1.0 + peak, best)  # every peak above every non-peak
    chosen = rank.topk(k, dim=1).indices.sort(dim=1).values
    return chosen, peak.gather(1, chosen)


def object_image_tokens(grid_tokens: torch.Tensor, centre_logits: torch.Tensor, k: int,
                        context_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The language model's image tokens: pooled context, then the ``k`` object patches.

    Args:
        grid_tokens: ``(images, side * side, width)`` projected patch tokens, row-major.
        centre_logits: ``(images, side * side, classes)`` the centre heatmap over them.
        k: object slots per image.
        context_grid: context tokens per side (adaptive average pooling of the patch grid).

    Returns:
        ``(tokens, patch_index)``: ``(images, context_grid ** 2 + k, width)`` tokens and the
        ``(images, context_grid ** 2 + k)`` int64 patch each stands for (``-1`` for context
        tokens and for object slots no peak above :data:`PEAK_THRESHOLD` filled, which carry
        zeros).
    """
    images, patches, width = grid_tokens.shape
    chosen, strength = select_object_patches(centre_logits, k)
    side = math.isqrt(patches)
    objects = grid_tokens.gather(1, chosen.unsqueeze(-1).expand(images, k, width))
    filled = strength > PEAK_THRESHOLD  # (images, k)
    objects = objects * filled.unsqueeze(-1).to(objects.dtype)
    square = grid_tokens.transpose(1, 2).reshape(images, width, side, side)
    context = F.adaptive_avg_pool2d(square, context_grid).flatten(2).transpose(1, 2)  # (images, g*g, width)
    index = torch.cat([torch.full((images, context_grid ** 2), -1, dtype=torch.long, device=chosen.device),
                       torch.where(filled, chosen, torch.full_like(chosen, -1))], dim=1)
    return torch.cat([context, objects], dim=1), index
