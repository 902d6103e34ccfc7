"""Object tokens: the image as a few pooled context tokens plus the patches where objects are.

With ``SkyMoEConfig.object_tokens = K`` the language model does not read every patch of the
image grid. A per-class centre heatmap head (``SkyMoEModel.object_scorer``, one logit per patch
and object class, trained by Stage 0 of the demo recipe) marks where object centres lie; the
image becomes ``object_context_grid ** 2`` average-pooled context tokens (row-major, for the
scene and the caption) followed by the projected tokens of the K patches with the strongest
centre peaks, in row-major patch order. Slots no peak above :data:`PEAK_THRESHOLD` fills carry a
zero token. The train/README's oracle runs found the language model learns to find and copy
from a handful of object tokens but not from the full grid.

With ``object_codes`` each object token also carries its detection, spelled the way the oracle
runs spelled it (train/README.md, "Oracle image tokens"): the patch's class probabilities, colour
probabilities and sine/cosine codes of its box corners on the 0-100 answer grid, read off the
tower's token by Stage 0's centre, colour and box heads and projected into the language model's
width by a learned map (:func:`detection_features`). A box corner is then one linear map away.

Patch frames: patches are numbered row-major from the top-left, ``index = row * side + column``.
Box head values, per patch: the object centre's offset inside the patch (x right, y down, in
patches, 0-1) and the box's natural-log width and height in patches.
"""

import math

import torch
import torch.nn.functional as F

from .position_codes import sincos_codes

__all__ = ["PEAK_THRESHOLD", "CORNER_CODE_WIDTH", "DETECTOR_MODULES", "select_object_patches",
           "object_image_tokens", "box_head_xyxy", "box_corners_on_grid", "detection_features",
           "detection_feature_width"]

#: Centre probability a peak must pass to fill an object slot (the Stage 0 check's detection threshold).
PEAK_THRESHOLD = 0.3

#: Sine/cosine values per box corner in the detection features (wavelengths 4 to 400 grid units,
#: as the coordinate tokens' own codes: neighbouring grid values stay apart, the image is spanned).
CORNER_CODE_WIDTH = 16

#: ``SkyMoEModel`` modules that detect objects (Stage 0's heads, frozen afterwards); the learned
#: ``object_code_projection`` is not one of them: it belongs to the language model.
DETECTOR_MODULES = ("object_scorer", "object_box_head", "object_colour_head")


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


def box_head_xyxy(centre: torch.Tensor, log_size: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` float32 ``(x1, y1, x2, y2)`` of boxes given as the box head writes them: a centre
    ``(..., 2)`` and a natural-log width and height ``(..., 2)``, both in patches (any origin)."""
    half = log_size.float().exp() / 2
    return torch.cat([centre.float() - half, centre.float() + half], dim=-1)


def box_corners_on_grid(box: torch.Tensor, patches: torch.Tensor, side: int) -> torch.Tensor:
    """Box corners, on the 0-100 answer grid, of box head values at the given patches.

    Args:
        box: ``(..., 4)`` box head values (centre offset in the patch, log width and height in patches).
        patches: ``(...)`` row-major patch index of each.
        side: patches per side of the grid.

    Returns:
        ``(..., 4)`` float32 ``(x1, y1, x2, y2)``, clamped to the image, 0-100.
    """
    box = box.float()
    patch_corner = torch.stack([patches % side, torch.div(patches, side, rounding_mode="floor")], dim=-1)
    corners = box_head_xyxy(patch_corner + box[..., :2], box[..., 2:].clamp(max=math.log(side)))
    return corners.clamp(0.0, float(side)) * (100.0 / side)


def detection_feature_width(classes: int, colours: int) -> int:
    """Width of :func:`detection_features`' output."""
    return classes + colours + 4 * CORNER_CODE_WIDTH


def detection_features(centre_logits: torch.Tensor, box: torch.Tensor, colour_logits: torch.Tensor,
                       patches: torch.Tensor) -> torch.Tensor:
    """What Stage 0's heads detect at the given patches, as features for the object tokens.

    Args:
        centre_logits: ``(images, side * side, classes)`` centre heatmap logits.
        box: ``(images, side * side, 4)`` box head values.
        colour_logits: ``(images, side * side, colours)`` colour logits.
        patches: ``(images, k)`` patch of each object slot (any valid index for empty slots,
            whose features the caller zeroes).

    Returns:
        ``(images, k, classes + colours + 4 * CORNER_CODE_WIDTH)`` float32: class probabilities
        (sigmoid of the heatmap), colour probabilities (softmax), then the codes of ``x1, y1, x2, y2``.
    """
    images, k = patches.shape
    side = math.isqrt(centre_logits.shape[1])

    def at_patches(values: torch.Tensor) -> torch.Tensor:
        return values.float().gather(1, patches.unsqueeze(-1).expand(images, k, values.shape[-1]))

    corners = box_corners_on_grid(at_patches(box), patches, side)
    codes = sincos_codes(corners.flatten(), CORNER_CODE_WIDTH, 4.0, 400.0)
    return torch.cat([torch.sigmoid(at_patches(centre_logits)), torch.softmax(at_patches(colour_logits), dim=-1),
                      codes.reshape(images, k, 4 * CORNER_CODE_WIDTH)], dim=-1)
