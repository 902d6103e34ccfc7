"""SkyMoE processor: CLIP-style pixels at the model's size, image-token expansion, Vicuna chat template.

Image rules (documented behaviour, not errors):

* **Size**: every image is resized straight to ``image_size x image_size`` (bicubic), with no
  centre crop, so no pixel is lost and non-square images are stretched. The 0-100 box grid of
  the answers therefore maps onto each axis of the *original* image independently
  (``x_px = x / 100 * width``, ``y_px = y / 100 * height``).
* **Mode**: ``RGB`` is used as is; ``L`` (grey) is replicated to three channels; ``P`` (palette)
  is expanded through its palette; ``LA`` / ``RGBA`` / ``PA`` are composited over black using
  the alpha channel (transparent = nodata = black); 16/32-bit and float images (``I;16``, ``I``,
  ``F``) are rescaled linearly from their own min..max to 0..255, then replicated. Numpy inputs
  must be ``uint8`` ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (channels last).
  Scene-consistent contrast stretching belongs upstream (``tiling``); this is a fallback.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image
from transformers import LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .configuration import SkyMoEConfig
from .prompts import VICUNA_CHAT_TEMPLATE, chat_template

__all__ = ["SkyMoEProcessor", "to_rgb_image"]

logger = logging.getLogger(__name__)

_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def to_rgb_image(image: Image.Image | np.ndarray) -> Image.Image:
    """Convert a PIL image or a uint8 array to an 8-bit RGB PIL image (rules in the module docstring).

    Args:
        image: PIL image of any common mode, or a uint8 array ``(H, W[, C])`` with C in 1, 3, 4.

    Returns:
        An ``RGB`` PIL image of the same width and height.

    Raises:
        ValueError: For arrays that are not uint8 or not channels-last with 1, 3 or 4 channels.
        TypeError: For anything that is neither a PIL image nor a numpy array.
    """
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if image.mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        image = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in {"LA", "RGBA", "PA"}:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)  # composite over black
        return Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """A channels-last uint8 array as a PIL image (grey, RGB or RGBA)."""
    if array.dtype != np.uint8:
        raise ValueError(
            f"image array must be uint8 (H, W, 3), got dtype {array.dtype}: stretch it to 0-255 first "
            "(tiling.open_raster does this per scene)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(array, mode="L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB" if array.shape[2] == 3 else "RGBA")
    raise ValueError(
        f"image array must be channels-last (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {array.shape}"
    )


class SkyMoEProcessor(LlavaProcessor):
    """LLaVA processor for SkyMoE: square resize without crop, mode conversion, Vicuna-v1 template.

    One ``<image>`` in the text expands to ``(image_size // patch_size) ** 2`` image tokens
    (1296 at 504 px with 14 px patches; 324 with 28 px patches), the CLS token being dropped
    (``vision_feature_select_strategy="default"``), or to ``image_seq_length`` tokens where it
    is given (a model with ``object_tokens``: context plus object tokens, not the patch grid).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        image_seq_length=None,
        **kwargs,
    ):
        self.image_seq_length = image_seq_length
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template if chat_template is not None else VICUNA_CHAT_TEMPLATE,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    @classmethod
    def for_config(cls, config: SkyMoEConfig, tokenizer: Any) -> SkyMoEProcessor:
        """Build the processor matching ``config``'s vision tower around ``tokenizer``.

        Args:
            config: The model config (image size, patch size, feature strategy, where the image goes
                in the chat template).
            tokenizer: A tokenizer that knows ``<image>``.

        Returns:
            The processor (CLIP mean/std, bicubic, no crop, ``image_size`` square).
        """
        size = config.vision_config.image_size
        image_processor = CLIPImageProcessorPil(
            size={"height": size, "width": size},
            do_center_crop=False,
            crop_size={"height": size, "width": size},
        )
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            chat_template=chat_template(config.image_after_question),
            image_seq_length=config.image_seq_length if config.object_tokens else None,
        )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """``<image>`` expanded to the model's image tokens (``image_seq_length`` where set)."""
        if self.image_seq_length is None:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        return self.image_token * self.image_seq_length

    def __call__(self, images=None, text=None, **kwargs):
        """Convert images to RGB (module rules), then LLaVA's processing (resize, normalise, expand ``<image>``).

        Args:
            images: A PIL image / uint8 array, or a list of them (one per ``<image>`` in ``text``).
            text: A prompt or a list of prompts containing ``<image>``.
            **kwargs: Passed to :class:`~transformers.LlavaProcessor` (``padding``, ``return_tensors``...).

        Returns:
            A ``BatchFeature`` with ``input_ids``, ``attention_mask`` and ``pixel_values``
            ``(num_images, 3, image_size, image_size)``.
        """
        if images is not None:
            single = isinstance(images, (Image.Image, np.ndarray))
            images = to_rgb_image(images) if single else [to_rgb_image(im) for im in images]
        return super().__call__(images=images, text=text, **kwargs)
