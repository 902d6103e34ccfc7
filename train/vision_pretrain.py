"""Stage 0 of the demo recipe: dense per-patch pretraining of the vision tower and projector.

The paper starts from a pretrained CLIP ViT. The demo cannot download one, and a tower trained
from scratch only through the language model's few answer tokens per image learns slowly where
objects are: the first demo checkpoints counted by the background and never grounded an object.
This stage gives the tower and projector what a pretrained encoder brings, from the synthetic
scenes' own annotations. Linear heads on the projected image tokens (the very vectors the
language model reads; one token per patch) predict, per patch:

* per object class, whether an object's centre lies in the patch (counting, finding): by default
  a CenterNet-style heatmap, a logit per patch trained with the penalty-reduced focal loss
  against Gaussian bumps around each centre patch (``centre_loss="heatmap"``); or the number of
  centres as a Poisson rate (``"poisson"``, the earlier recipe: on CPU its rates stayed smeared
  below 0.5 in every patch, so no object stood out; train/README.md, Stage 0),
* per object class, the share of the patch its boxes cover (extent of large objects),
* where an object's centre lies in the patch: the centre's offset inside the patch and the
  box's log width and height in patches (grounding), and the object's colour (the largest
  such object when several share a patch),
* where the patch is: its row and column (classes), and, for every patch a box overlaps, that
  box's corners on the 0-100 answer grid (101 classes each; the smallest such box). These are
  the only targets that are not the same wherever the object lies: without them the tower
  learns to drop the absolute position its input embeddings carry, and the language model has
  no place to copy into a box answer. With them, each of an object's tokens holds the box
  the answer must spell, in a linear read-out,

and, from the mean image token, the scene class. The class-cover and colour heads read the
tokens along the language model's own word embeddings of the class and colour names
(:class:`PatchHeads`), so a patch comes out pointing where the word that names it does.
Images are flipped at random (targets flipped with them). The heads are dropped afterwards;
only the tower and projector keep what they learned, and the language-model stages go on
training them.

``objects.jsonl`` (one line per training image: ``image`` path relative to the file,
``scene_class``, ``width``, ``height``, ``objects`` as ``{"label", "box_px", "colour"}``) is
written by :func:`train.demo.build_training_data`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from skymoe.object_tokens import box_head_xyxy
from skymoe.tokenization import GRID_TOKENS
from train.box_attention import box_patch_mask
from train.loop import bf16_autocast, seconds_per_call_after_prefetch

__all__ = ["PatchVocabulary", "PatchTargets", "patch_targets", "PatchHeads", "word_directions", "CentreLoss",
           "centre_heatmap", "heatmap_focal_loss", "centre_probability", "centre_peaks_near", "centre_peaks",
           "xyxy_iou", "centre_box_iou", "read_object_annotations", "VisionPretrainReport", "pretrain_vision"]

logger = logging.getLogger(__name__)

CentreLoss = Literal["heatmap", "poisson"]
HEATMAP_SIGMA = 0.75  # patches: a neighbour of a centre patch is a 0.41 target, a diagonal one 0.17
CENTRE_PRIOR_LOGIT = -4.6  # sigmoid = 0.01: at the start every patch is empty, as ~95 % of them are
DETECTION_THRESHOLD = 0.3  # a local maximum of the centre probability above this is one object


@dataclass(frozen=True)
class PatchVocabulary:
    """The label sets the heads predict (order = output index)."""

    object_classes: tuple[str, ...]
    colours: tuple[str, ...]
    scene_classes: tuple[str, ...]


@dataclass
class PatchTargets:
    """Targets of one image on its ``side x side`` patch grid (row-major, row 0 at the top).

    Attributes:
        centres: ``(side, side, K)`` number of object centres of each class in each patch.
        cover: ``(side, side, K)`` share of each patch covered by boxes of each class, in [0, 1].
        box: ``(side, side, 4)`` centre offset ``(dx, dy)`` in [0, 1) of the patch and
            ``(log w, log h)`` of the box in patch units, where ``has_box``.
        has_box: ``(side, side)`` a centre lies in the patch.
        colour: ``(side, side)`` colour index of that object, -100 where unknown or no centre.
        corners: ``(side, side, 4)`` ``(x1, y1, x2, y2)`` on the 0-100 answer grid of the smallest
            box that overlaps the patch (as :func:`train.box_attention.box_patch_mask` marks
            patches), -100 where no box does.
        scene: scene class index, -100 when unknown.
    """

    centres: np.ndarray
    cover: np.ndarray
    box: np.ndarray
    has_box: np.ndarray
    colour: np.ndarray
    corners: np.ndarray
    scene: int


def patch_targets(objects: list[dict], scene_class: str | None, width: int, height: int, side: int,
                  vocab: PatchVocabulary) -> PatchTargets:
    """Per-patch targets of one image.

    Args:
        objects: ``{"label", "box_px": (x1, y1, x2, y2), "colour"}`` in the image's pixel frame
            (``colour`` may be None); labels outside ``vocab`` are ignored.
        scene_class: the image's scene class, or None.
        width, height: image size in px; the image is resized to the square ``side``-patch grid,
            so x is scaled by ``side / width`` and y by ``side / height``.
        side: patches per side.
        vocab: label sets.
    """
    k = len(vocab.object_classes)
    centres = np.zeros((side, side, k), np.float32)
    cover = np.zeros((side, side, k), np.float32)
    box = np.zeros((side, side, 4), np.float32)
    has_box = np.zeros((side, side), bool)
    colour = np.full((side, side), -100, np.int64)
    best_area = np.zeros((side, side), np.float32)
    cells = np.arange(side, dtype=np.float32)
    for obj in objects:
        if obj["label"] not in vocab.object_classes:
            continue
        c = vocab.object_classes.index(obj["label"])
        x1, y1, x2, y2 = obj["box_px"]
        # box in patch units (x right, y down)
        x1, x2 = x1 * side / width, x2 * side / width
        y1, y2 = y1 * side / height, y2 * side / height
        overlap_x = np.clip(np.minimum(x2, cells + 1) - np.maximum(x1, cells), 0.0, 1.0)
        overlap_y = np.clip(np.minimum(y2, cells + 1) - np.maximum(y1, cells), 0.0, 1.0)
        cover[:, :, c] = np.maximum(cover[:, :, c], np.outer(overlap_y, overlap_x))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        col, row = min(int(cx), side - 1), min(int(cy), side - 1)
        centres[row, col, c] += 1
        w, h = max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)
        if w * h > best_area[row, col]:
            best_area[row, col] = w * h
            box[row, col] = (cx - col, cy - row, math.log(w), math.log(h))
            has_box[row, col] = True
            colour[row, col] = vocab.colours.index(obj["colour"]) if obj.get("colour") in vocab.colours else -100
    scene = vocab.scene_classes.index(scene_class) if scene_class in vocab.scene_classes else -100
    return PatchTargets(centres, cover, box, has_box, colour, box_corners(objects, width, height, side, vocab), scene)


def box_corners(objects: list[dict], width: int, height: int, side: int, vocab: PatchVocabulary) -> np.ndarray:
    """The ``corners`` target of :class:`PatchTargets` (arguments as :func:`patch_targets`)."""
    corners = np.full((side * side, 4), -100, np.int64)
    known = [o for o in objects if o["label"] in vocab.object_classes]
    grid_boxes = [(x1 * 100 / width, y1 * 100 / height, x2 * 100 / width, y2 * 100 / height)
                  for x1, y1, x2, y2 in (o["box_px"] for o in known)]
    # largest first, so where boxes overlap the smaller (e.g. a car on a road) is written last and kept
    for grid_box in sorted(grid_boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])):
        corners[box_patch_mask(grid_box, side).numpy()] = np.clip(np.round(grid_box), 0, 100).astype(np.int64)
    return corners.reshape(side, side, 4)


def _flipped(objects: list[dict], width: int, height: int, horizontal: bool, vertical: bool) -> list[dict]:
    """Objects of the image mirrored left-right and/or top-bottom (pixel frame)."""
    out = []
    for obj in objects:
        x1, y1, x2, y2 = obj["box_px"]
        if horizontal:
            x1, x2 = width - x2, width - x1
        if vertical:
            y1, y2 = height - y2, height - y1
        out.append({**obj, "box_px": (x1, y1, x2, y2)})
    return out


GRID_VALUES = len(GRID_TOKENS)  # the answer grid <0>..<100>
#: Cover logits per unit cosine when Stage 0 aligns patches by cosine (logit 10 (cos - 0.5): a
#: covered patch needs a cosine near 0.8 for +3, an uncovered one 0.2 or less for -3).
COVER_TEMPERATURE = 10.0


class PatchHeads(nn.Module):
    """Heads on the projected image tokens: per patch ``K`` centre logits (or log-rates, with the
    Poisson centre loss), ``K`` cover logits,
    4 box values, ``C`` colour logits, ``2 x side`` row and column logits and ``4 x 101`` corner
    logits; per image the scene logits (mean token).

    The cover and colour logits, the heads that name what a patch shows, are not free linear
    maps: each is the token's projection on its class's or colour's word direction in the
    language model's input embeddings (``names``), scaled and offset. So a "truck" patch leaves
    Stage 0 pointing the way the word " truck" does, and a language-model head can find the
    patches a question names by matching like with like, a map it learns once for all words,
    instead of one learned key per class. (Measured on CPU: the alignment holds, 86 % of held-out
    patches lie nearest their class's word, but the demo's scores did not improve; README, Known
    limits.)

    With ``cover_temperature`` the cover logits are that fixed multiple of the token's *cosine*
    with the class direction, offset by half of it: a patch must turn more than 60 degrees
    towards a class to be called covered by it. A projection with a learned scale is satisfied
    by a tiny cosine on a long token, and a learned offset by tokens that point away from every
    class, the covered one least (held-out mean cosine -0.12 on CPU): the nearest direction right
    but the token pointing almost anywhere. An attention head reading the normalised token
    (:mod:`train.word_match`) needs the direction itself.
    """

    def __init__(self, width: int, vocab: PatchVocabulary, side: int, names: torch.Tensor,
                 cover_temperature: float | None = None):
        """``names``: ``(K + C, width)`` unit word directions, object classes then colours (:func:`word_directions`)."""
        super().__init__()
        self.k, self.c = len(vocab.object_classes), len(vocab.colours)
        if names.shape != (self.k + self.c, width):
            raise ValueError(f"names must be ({self.k + self.c}, {width}) word directions, got {tuple(names.shape)}")
        self.register_buffer("names", names.detach().clone(), persistent=False)
        self.cover_temperature = cover_temperature
        self.name_scale = nn.Parameter(torch.ones(self.k + self.c))
        self.name_bias = nn.Parameter(torch.zeros(self.k + self.c))
        self.sizes = {"centres": self.k, "box": 4, "row": side, "column": side, "corners": 4 * GRID_VALUES}
        self.patch = nn.Linear(width, sum(self.sizes.values()))
        self.scene = nn.Linear(width, len(vocab.scene_classes))

    def rows(self, part: str) -> slice:
        """The rows of ``patch`` (its weight and bias) that write the output ``part`` (a key of ``sizes``)."""
        start = 0
        for name, size in self.sizes.items():
            if name == part:
                return slice(start, start + size)
            start += size
        raise KeyError(f"PatchHeads has no linear output {part!r}; it has {list(self.sizes)}")

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """``tokens``: ``(batch, side * side, width)``; returns the head outputs by name
        (``corners``: ``(batch, side * side, 4, 101)``)."""
        parts = dict(zip(self.sizes, self.patch(tokens).split(list(self.sizes.values()), dim=-1)))
        parts["corners"] = parts["corners"].unflatten(-1, (4, GRID_VALUES))
        named = (tokens @ self.names.to(tokens.dtype).T) * self.name_scale + self.name_bias
        parts["cover"], parts["colour"] = named.split([self.k, self.c], dim=-1)
        if self.cover_temperature is not None:
            cosine = F.normalize(tokens, dim=-1) @ self.names[:self.k].to(tokens.dtype).T
            parts["cover"] = self.cover_temperature * (cosine - 0.5)
        return {**parts, "scene": self.scene(tokens.mean(dim=1))}


def word_directions(tokenizer, embeddings: torch.Tensor, vocab: PatchVocabulary) -> torch.Tensor:
    """Unit direction of each object class, then each colour, in the input ``embeddings``
    ``(vocab size, width)``: the mean embedding of the name's tokens as a prompt spells it
    (after a space, e.g. " storage tank" -> " storage", " tank")."""
    rows = []
    for name in (*vocab.object_classes, *vocab.colours):
        ids = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        rows.append(embeddings[ids].float().mean(dim=0))
    return F.normalize(torch.stack(rows).detach(), dim=-1)


def _stack(targets: list[PatchTargets]) -> dict[str, torch.Tensor]:
    def flat(name: str) -> torch.Tensor:
        arr = np.stack([getattr(t, name) for t in targets])
        return torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1] * arr.shape[2], *arr.shape[3:]))
    return {"centres": flat("centres"), "cover": flat("cover"), "box": flat("box"), "has_box": flat("has_box"),
            "colour": flat("colour"), "corners": flat("corners"), "scene": torch.tensor([t.scene for t in targets])}


def _patch_rows_and_columns(patches: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of each patch of a square, row-major grid."""
    side = math.isqrt(patches)
    index = torch.arange(patches, device=device)
    return index // side, index % side


def head_losses(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                box_weight: float = 1.0, centre_loss: CentreLoss = "heatmap") -> dict[str, torch.Tensor]:
    """Per-term losses (each summed over classes, averaged over patches / images), the box term
    (L1 of the centre offset and log size) times ``box_weight``; the centre term by
    ``centre_loss`` (:func:`heatmap_focal_loss` on logits, or Poisson on log-rates)."""
    k = outputs["centres"].shape[-1]
    has_box = targets["has_box"]
    if centre_loss == "heatmap":
        centres = heatmap_focal_loss(outputs["centres"], centre_heatmap(targets["centres"]))
    else:
        centres = F.poisson_nll_loss(outputs["centres"].float(), targets["centres"], log_input=True) * k
    losses = {
        "centres": centres,
        "cover": F.binary_cross_entropy_with_logits(outputs["cover"].float(), targets["cover"]) * k,
        "box": (box_weight * F.l1_loss(outputs["box"][has_box].float(), targets["box"][has_box]) if has_box.any()
                else outputs["box"].sum() * 0.0),
        "colour": (F.cross_entropy(outputs["colour"][has_box].float(), targets["colour"][has_box], ignore_index=-100)
                   if (targets["colour"][has_box] >= 0).any() else outputs["colour"].sum() * 0.0),
        "scene": (F.cross_entropy(outputs["scene"].float(), targets["scene"], ignore_index=-100)
                  if (targets["scene"] >= 0).any() else outputs["scene"].sum() * 0.0),
    }
    batch, patches = outputs["row"].shape[:2]
    rows, columns = (t.expand(batch, patches) for t in _patch_rows_and_columns(patches, outputs["row"].device))
    losses["position"] = (F.cross_entropy(outputs["row"].float().flatten(0, 1), rows.flatten())
                          + F.cross_entropy(outputs["column"].float().flatten(0, 1), columns.flatten()))
    corners = targets["corners"]
    losses["corners"] = (F.cross_entropy(outputs["corners"].float().flatten(0, 2), corners.flatten(), ignore_index=-100)
                         if (corners >= 0).any() else outputs["corners"].sum() * 0.0)
    return losses


def centre_heatmap(centres: torch.Tensor, sigma: float = HEATMAP_SIGMA) -> torch.Tensor:
    """CenterNet's target heatmap on the patch grid.

    Args:
        centres: ``(batch, side * side, K)`` number of object centres of each class per patch
            (row-major).
        sigma: width of the bump, in patches.

    Returns:
        ``(batch, side * side, K)`` float32 in ``[0, 1]``: exactly 1 at a patch holding a centre
        of the class, else ``exp(-d^2 / (2 sigma^2))`` of the distance ``d`` (patches) to the
        nearest such patch within two rows and columns (the largest bump where they overlap), 0
        beyond.
    """
    batch, patches, k = centres.shape
    peaks = _class_maps(centres > 0).flatten(0, 1).unsqueeze(1)  # (batch * K, 1, side, side)
    offsets = torch.arange(-2, 3, dtype=torch.float32, device=centres.device)
    bump = torch.exp(-(offsets[:, None] ** 2 + offsets[None] ** 2) / (2 * sigma**2)).flatten()  # (25,)
    windows = F.unfold(peaks, kernel_size=5, padding=2)  # (batch * K, 25, patches); zero beyond the edge
    heat = (windows * bump[:, None]).amax(dim=1)
    return _patch_rows(heat.reshape(batch, k, patches))


def heatmap_focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), summed over patches and classes
    and divided by the number of centre patches (at least 1).

    Why not the Poisson rate: about 14 centres share 324 patches x 10 classes, and a rate model
    is rewarded for spreading small rates everywhere; the focal terms down-weight the many easy
    empty patches and the neighbours of a centre (``1 - heat``), so the centre patch must stand out.
    """
    logits = logits.float()
    positive = heat >= 1.0
    p = logits.sigmoid()
    terms = torch.where(positive, (1 - p) ** 2 * F.logsigmoid(logits),
                        (1 - heat) ** 4 * p**2 * F.logsigmoid(-logits))
    return -terms.sum() / positive.sum().clamp(min=1)


def centre_probability(centre_outputs: torch.Tensor, centre_loss: CentreLoss) -> torch.Tensor:
    """Probability that a centre of the class lies in the patch: the heatmap's sigmoid, or
    ``P(N >= 1) = 1 - exp(-rate)`` of a Poisson rate."""
    if centre_loss == "heatmap":
        return centre_outputs.float().sigmoid()
    return -torch.expm1(-centre_outputs.float().exp())


def centre_peaks_near(marked: torch.Tensor) -> torch.Tensor:
    """``(batch, side * side, K)`` bool: a marked patch of the class lies within one row and
    column (the 3 x 3 neighbourhood), so a peak one patch off a centre near a border still counts."""
    return _patch_rows(F.max_pool2d(_class_maps(marked), 3, stride=1, padding=1) > 0)


def centre_peaks(probability: torch.Tensor, threshold: float = DETECTION_THRESHOLD) -> torch.Tensor:
    """``(batch, side * side, K)`` bool: the patch is a local maximum of its class's centre
    probability over its 3 x 3 neighbourhood and above ``threshold`` (one detected object)."""
    grid = _class_maps(probability)
    return _patch_rows((grid == F.max_pool2d(grid, 3, stride=1, padding=1)) & (grid > threshold))


def _class_maps(per_patch: torch.Tensor) -> torch.Tensor:
    """``(batch, side * side, K)`` row-major patch values -> ``(batch, K, side, side)`` float maps."""
    batch, patches, k = per_patch.shape
    side = math.isqrt(patches)
    return per_patch.float().permute(0, 2, 1).reshape(batch, k, side, side)


def _patch_rows(maps: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_class_maps` (any dtype): ``(batch, K, ...)`` -> ``(batch, patches, K)``."""
    return maps.flatten(2).permute(0, 2, 1)


def read_object_annotations(path: Path) -> list[dict]:
    """Lines of an ``objects.jsonl`` (module docstring), image paths made absolute.

    Raises:
        ValueError: a line is not valid JSON or lacks a field (names the line).
    """
    records = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not an object-annotation line ({err}); "
                             "regenerate it with train.demo.build_training_data") from err
        fields = ("image", "scene_class", "width", "height", "objects")
        missing = [k for k in fields if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"{path}:{line_no}: not an object-annotation line (missing {', '.join(missing)}); "
                             "regenerate it with train.demo.build_training_data")
        records.append({**rec, "image": str(Path(path).parent / rec["image"])})
    return records


@dataclass
class VisionPretrainReport:
    """What Stage 0 did (``training_summary.json``)."""

    images: int
    steps_planned: int
    steps_done: int
    seconds: float
    seconds_per_step: float
    first_losses: dict[str, float] = field(default_factory=dict)
    last_losses: dict[str, float] = field(default_factory=dict)
    held_out: dict[str, float] = field(default_factory=dict)


class _PatchSamples(torch.utils.data.Dataset):
    """``(pixel_values (3, H, W), targets)`` of one image, keyed by ``(index, h_flip, v_flip)``.

    The flips are drawn in the training process (:func:`_key_batches`), so the data are the
    same whichever loader worker decodes the image.
    """

    def __init__(self, records: list[dict], image_processor, side: int, vocab: PatchVocabulary):
        self.records, self.image_processor, self.side, self.vocab = records, image_processor, side, vocab

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, bool, bool]) -> tuple[torch.Tensor, PatchTargets]:
        index, h_flip, v_flip = key
        rec = self.records[index]
        with Image.open(rec["image"]) as img:
            image = img.convert("RGB")
        image = ImageOps.mirror(image) if h_flip else image
        image = ImageOps.flip(image) if v_flip else image
        objects = _flipped(rec["objects"], rec["width"], rec["height"], h_flip, v_flip)
        targets = patch_targets(objects, rec["scene_class"], rec["width"], rec["height"], self.side, self.vocab)
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0], targets


def _collate(items: list[tuple[torch.Tensor, PatchTargets]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return torch.stack([pixels for pixels, _ in items]), _stack([targets for _, targets in items])


def _key_batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Endless batches of ``(index, h_flip, v_flip)`` keys: epochs of shuffled ``indices``, random flips
    (batches of all ``indices`` when there are fewer than ``batch_size``)."""
    batch_size = min(batch_size, len(indices))
    while True:
        order = rng.permutation(indices)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            flips = rng.random((batch_size, 2)) < 0.5
            yield [(int(i), bool(h), bool(v)) for i, (h, v) in zip(order[start:start + batch_size], flips)]


def _loader(samples: _PatchSamples, key_batches, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(samples, batch_sampler=key_batches, collate_fn=_collate, num_workers=workers)


def _image_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected image tokens the language model reads, ``(batch, patches, text width)``."""
    dtype = model.model.multi_modal_projector.linear_1.weight.dtype
    return model.model.patch_tokens(pixel_values.to(dtype))


def xyxy_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of two ``(n, 4)`` sets of ``(x1, y1, x2, y2)`` boxes (any one unit)."""
    overlap = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(dim=1)
    union = (a[:, 2:] - a[:, :2]).prod(dim=1) + (b[:, 2:] - b[:, :2]).prod(dim=1) - overlap
    return overlap / union.clamp(min=1e-9)


def centre_box_iou(box: torch.Tensor, truth: torch.Tensor, centre_offset: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of boxes written as ``box`` head values (centre offset in the patch, log width and
    height in patches; ``(n, 4)``) against ``truth`` of the same form, both at the same patches.

    ``centre_offset`` ``(2,)`` replaces the predicted offset (e.g. the patch middle, 0.5, 0.5):
    the IoU a box of the right size would reach knowing only which patch holds the centre.
    """
    centre = box[:, :2] if centre_offset is None else centre_offset.to(box).expand(len(box), 2)
    return xyxy_iou(box_head_xyxy(centre, box[:, 2:]), box_head_xyxy(truth[:, :2], truth[:, 2:]))


@torch.no_grad()
def _held_out_check(model, heads: PatchHeads, samples: _PatchSamples, indices: np.ndarray,
                    workers: int, centre_loss: CentreLoss, bf16: bool) -> dict[str, float]:
    """Count accuracy from the centre heads, exact and within one, over the classes present in
    an image (heatmap: peaks of :func:`centre_peaks`; Poisson: sum of rates, rounded), how many
    centre patches have a peak of their class within one patch (recall) and how many peaks have
    a centre patch of their class within one patch (precision), box-centre error
    in patches and colour accuracy at centre patches, patch row and column accuracy, and the
    corner heads' error in grid units (mean over patches a box overlaps and the 4 corners), and
    how often a patch at least half covered by one class lies nearer (cosine) that class's word
    direction than any other class's and its mean cosine with that direction, on images Stage 0
    did not train on.

    Grounding ceilings at the patches holding a box centre, as the share of boxes with IoU >= 0.5
    against the object's: the box head's box (offset and size) and the corner heads' box (what a
    language model that found the right patch could copy), and a box of the true size placed at
    the patch middle (what finding the patch alone buys: small objects need the offset inside
    the patch)."""
    model.eval()
    exact = within1 = total = 0
    found = centre_n = true_peaks = peak_n = 0
    centre_err, colour_hits, colour_n = [], 0, 0
    position_hits = position_n = 0
    corner_err = []
    word_hits = word_n = 0
    class_cosines = []
    box_ious, corner_ious, patch_only_ious = [], [], []
    device = next(model.parameters()).device
    keys = [[(int(i), False, False) for i in indices[start:start + 16]] for start in range(0, len(indices), 16)]
    for pixel_values, targets in _loader(samples, keys, workers):
        targets = {name: t.to(device) for name, t in targets.items()}
        with bf16_autocast(device, bf16):
            tokens = _image_tokens(model, pixel_values.to(device))
            out = heads(tokens)
        cover, covered_class = targets["cover"].max(dim=-1)
        cosines = F.normalize(tokens.float(), dim=-1) @ heads.names[:heads.k].T
        word_hits += int((cosines.argmax(dim=-1) == covered_class)[cover >= 0.5].sum())
        class_cosines.append(cosines.gather(-1, covered_class.unsqueeze(-1)).squeeze(-1)[cover >= 0.5])
        word_n += int((cover >= 0.5).sum())
        peaks = centre_peaks(centre_probability(out["centres"], centre_loss))
        predicted = (peaks.sum(dim=1).float() if centre_loss == "heatmap"
                     else out["centres"].float().exp().sum(dim=1).round())
        truth = targets["centres"].sum(dim=1)
        present = truth > 0
        exact += int((predicted[present] == truth[present]).sum())
        within1 += int(((predicted - truth).abs() <= 1)[present].sum())
        total += int(present.sum())
        centre_patch = targets["centres"] > 0
        found += int((centre_peaks_near(peaks) & centre_patch).sum())
        centre_n += int(centre_patch.sum())
        true_peaks += int((peaks & centre_peaks_near(centre_patch)).sum())
        peak_n += int(peaks.sum())
        has_box = targets["has_box"]
        centre_err.append((out["box"][has_box][:, :2].float() - targets["box"][has_box][:, :2]).abs().mean(dim=1))
        box_ious.append(centre_box_iou(out["box"][has_box].float(), targets["box"][has_box]))
        corner_ious.append(xyxy_iou(out["corners"][has_box].argmax(-1).float(),
                                    targets["corners"][has_box].float()))
        patch_only_ious.append(centre_box_iou(targets["box"][has_box], targets["box"][has_box],
                                              torch.tensor([0.5, 0.5])))
        colour_known = targets["colour"][has_box] >= 0
        colour_hits += int((out["colour"][has_box].argmax(-1) == targets["colour"][has_box])[colour_known].sum())
        colour_n += int(colour_known.sum())
        rows, columns = _patch_rows_and_columns(out["row"].shape[1], device)
        position_hits += int(((out["row"].argmax(-1) == rows) & (out["column"].argmax(-1) == columns)).sum())
        position_n += out["row"].shape[0] * out["row"].shape[1]
        in_box = targets["corners"][..., 0] >= 0
        corner_err.append((out["corners"][in_box].argmax(-1) - targets["corners"][in_box]).abs().float().flatten())
    model.train()
    corner_err = torch.cat(corner_err) if corner_err else torch.zeros(0)
    return {"images": float(len(indices)), "count_exact": 100.0 * exact / max(1, total),
            "count_within1": 100.0 * within1 / max(1, total),
            "centre_recall": 100.0 * found / max(1, centre_n),
            "centre_precision": 100.0 * true_peaks / max(1, peak_n),
            "centre_error_patches": float(torch.cat(centre_err).mean()) if centre_err else float("nan"),
            "colour_accuracy": 100.0 * colour_hits / max(1, colour_n),
            "position_accuracy": 100.0 * position_hits / max(1, position_n),
            "corner_error_grid": float(corner_err.mean()) if len(corner_err) else float("nan"),
            "word_match_accuracy": 100.0 * word_hits / max(1, word_n),
            "class_direction_cosine": float(torch.cat(class_cosines).mean()) if class_cosines else float("nan"),
            "centre_box_acc50": _percent_iou50(box_ious), "corner_box_acc50": _percent_iou50(corner_ious),
            "patch_only_acc50": _percent_iou50(patch_only_ious)}


def _percent_iou50(ious: list[torch.Tensor]) -> float:
    """Percent of the IoUs (batches concatenated) at or above 0.5; NaN for none."""
    ious = torch.cat(ious)
    return 100.0 * float((ious >= 0.5).float().mean()) if len(ious) else float("nan")


def pretrain_vision(model, processor, objects_jsonl: Path, vocab: PatchVocabulary, seconds: float, lr: float,
                    batch_size: int, seed: int, held_out: int = 64, log_every: int = 25,
                    workers: int = 0, box_weight: float = 1.0,
                    class_directions: torch.Tensor | None = None,
                    centre_loss: CentreLoss = "heatmap", bf16: bool = True) -> VisionPretrainReport:
    """Train the vision tower and projector of ``model`` in place with :class:`PatchHeads` for about ``seconds``.

    Trains on the model's device, in bf16 autocast where it runs natively and ``bf16``
    (:func:`train.loop.bf16_autocast`). The step count is planned from a
    measured step time (AdamW, warmup 5 %, cosine to 10 % of ``lr``, gradient norm clipped at
    1); the run stops early if it falls behind. The last ``held_out`` images are kept out of
    training for the closing check.

    Args:
        model: a dense or MoE SkyMoE (fp32); only ``vision_tower`` and ``multi_modal_projector`` change.
        processor: its processor (the image processor resizes and normalises as at inference;
            the tokenizer spells the class and colour names for :func:`word_directions`).
        objects_jsonl: per-image object annotations (module docstring).
        vocab: label sets of the heads.
        seconds: time budget of the stage.
        lr: peak learning rate.
        batch_size: images per step.
        seed: data order and flips.
        held_out: images kept for the closing check.
        log_every: log the loss terms every this many steps.
        workers: loader processes decoding images (0 = in this process).
        box_weight: weight of the box-head loss (:func:`head_losses`).
        class_directions: ``(K, width)`` unit directions the class-cover head aligns each class's
            patches with, instead of the class words' (:mod:`train.word_match`), through the
            tokens' cosine (:class:`PatchHeads`, ``cover_temperature`` :data:`COVER_TEMPERATURE`);
            colours keep their words' directions.
        centre_loss: how the centre head learns (:func:`head_losses`): ``"heatmap"`` (logits,
            :func:`heatmap_focal_loss`) or ``"poisson"`` (log-rates).
        bf16: bf16 autocast where the hardware runs it natively (``False``: fp32).
    """
    records = read_object_annotations(objects_jsonl)
    if len(records) <= held_out:
        held_out = max(1, len(records) // 5)
    train_ids, check_ids = np.arange(len(records) - held_out), np.arange(len(records) - held_out, len(records))
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    names = word_directions(processor.tokenizer, model.get_input_embeddings().weight, vocab)
    if class_directions is not None:
        names = torch.cat([class_directions.to(names), names[len(vocab.object_classes):]])
    heads = PatchHeads(model.config.text_config.hidden_size, vocab, side, names,
                       None if class_directions is None else COVER_TEMPERATURE).to(device)
    if centre_loss == "heatmap":
        with torch.no_grad():  # CenterNet's prior: otherwise the empty patches' loss swamps the first steps
            heads.patch.bias[heads.rows("centres")].fill_(CENTRE_PRIOR_LOGIT)
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    optimizer = torch.optim.AdamW([*params, *heads.parameters()], lr=lr, weight_decay=0.0)
    samples = _PatchSamples(records, processor.image_processor, side, vocab)
    batches = iter(_loader(samples, _key_batches(train_ids, batch_size, np.random.default_rng(seed)), workers))
    model.train()

    def step() -> dict[str, float]:
        pixel_values, targets = next(batches)
        targets = {name: t.to(device) for name, t in targets.items()}
        with bf16_autocast(device, bf16):
            losses = head_losses(heads(_image_tokens(model, pixel_values.to(device))), targets, box_weight,
                                  centre_loss)
        loss = sum(losses.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*params, *heads.parameters()], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), **{name: v.item() for name, v in losses.items()}}

    # timing at lr 0 (the weights must not move), once the batches the loader workers prefetched
    # (two each) are used up, so a stage bound by image decoding is timed as such
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    start = time.monotonic()
    per_step, timing_steps = seconds_per_call_after_prefetch(step, workers)
    total = max(1, int(0.9 * (seconds - (time.monotonic() - start)) / per_step))
    warmup = max(1, total // 20)
    logger.info("stage 0 (vision) on %s: %d images, %.3f s/step measured -> %d steps of %d images",
                device, len(train_ids), per_step, total, batch_size)
    report = VisionPretrainReport(len(train_ids), total, 0, 0.0, per_step)
    for t in range(total):
        progress = t / max(1, total - 1)
        scale = (t + 1) / warmup if t < warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        losses = step()
        report.steps_done = t + 1
        report.first_losses = report.first_losses or losses
        report.last_losses = losses
        if (t + 1) % log_every == 0 or t + 1 == total:
            logger.info("stage 0 step %d/%d lr %.2e %s", t + 1, total, lr * scale,
                        " ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if time.monotonic() - start > seconds:
            logger.warning("stage 0: out of its time share at step %d of %d", t + 1, total)
            break
    del batches  # stops the loader's workers
    report.seconds = time.monotonic() - start
    report.seconds_per_step = report.seconds / (report.steps_done + timing_steps)
    report.held_out = _held_out_check(model, heads, samples, check_ids, workers, centre_loss, bf16)
    logger.info("stage 0 held-out check: %s", json.dumps(report.held_out))
    if model.config.object_tokens:
        _keep_detector_heads(model, heads)
    return report


@torch.no_grad()
def _keep_detector_heads(model, heads: PatchHeads) -> None:
    """Copy the trained centre head into the model's ``object_scorer``, which picks its object
    tokens, and, for a model with ``object_codes``, the box and colour heads into
    ``object_box_head`` and ``object_colour_head``, which describe them."""
    scorer = model.model.object_scorer
    if scorer.out_features != heads.k:
        raise ValueError(f"the model's object_scorer has {scorer.out_features} classes, Stage 0 trained {heads.k}: "
                         "set object_classes to the number of object classes")
    scorer.weight.copy_(heads.patch.weight[heads.rows("centres")])
    scorer.bias.copy_(heads.patch.bias[heads.rows("centres")])
    if not model.config.object_codes:
        return
    colour_head = model.model.object_colour_head
    if colour_head.out_features != heads.c:
        raise ValueError(f"the model's object_colour_head has {colour_head.out_features} colours, Stage 0 trained "
                         f"{heads.c}: set object_colours to the number of colours")
    model.model.object_box_head.weight.copy_(heads.patch.weight[heads.rows("box")])
    model.model.object_box_head.bias.copy_(heads.patch.bias[heads.rows("box")])
    # PatchHeads.forward: colour logits = (token . colour word direction) * scale + bias
    colours = slice(heads.k, heads.k + heads.c)
    colour_head.weight.copy_(heads.names[colours] * heads.name_scale[colours, None])
    colour_head.bias.copy_(heads.name_bias[colours])
