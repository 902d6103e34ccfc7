"""SkyMoE configuration: a LLaVA-1.5 config plus the Mixture-of-Experts fields.

The MoE fields follow the SkyMoE paper (E experts per MoE layer, top-k routing,
load-balancing auxiliary loss of eq. 7-8 weighted by alpha) and DESIGN.md section 3.
"""

import logging
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

from .errors import SkyMoEConfigError

__all__ = ["SkyMoEConfig", "NUM_TASKS", "default_moe_layers"]

logger = logging.getLogger(__name__)

#: Number of task ids understood by ``router_mode="task"`` (the order of ``skymoe.prompts.TASK_IDS``).
NUM_TASKS = 5


def default_moe_layers(num_hidden_layers: int) -> list[int]:
    """Every second decoder layer, odd indices: ``[1, 3, 5, ...]``.

    This is Qwen2-MoE's ``decoder_sparse_step=2`` parity (a layer is sparse when
    ``(idx + 1) % 2 == 0``): the first decoder layer stays dense, the last one of an
    even-depth stack is sparse. For Vicuna-7B (32 layers) that is 16 MoE layers.

    Args:
        num_hidden_layers: Depth of the language model.

    Returns:
        The sorted MoE layer indices.
    """
    return list(range(1, num_hidden_layers, 2))


@strict
class SkyMoEConfig(LlavaConfig):
    r"""Configuration of a SkyMoE vision-language model.

    A :class:`transformers.LlavaConfig` (CLIP vision tower, 2-layer MLP projector,
    Llama language model) with the MoE fields below. With no arguments it describes
    the full-size layout: CLIP ViT-L/14 at 504 px (36 x 36 = 1296 image tokens),
    a Llama-7B (Vicuna-7B) decoder, 8 experts, top-2, every second layer.

    Args:
        num_experts: E, experts per MoE layer (paper: 8). ``1`` means a dense model
            (no MoE layers).
        num_experts_per_tok: k, experts that process each token (paper: 2), ``1 <= k <= E``.
        moe_layers: Decoder-layer indices whose FFN is a MoE block. ``None`` means every
            second layer with ODD indices ``1, 3, 5, ...`` (Qwen2-MoE's parity, see
            :func:`default_moe_layers`); ``[]`` means dense. Indices must lie in
            ``[0, text_config.num_hidden_layers)``.
        router_aux_loss_coef: alpha, weight of the load-balancing loss in ``LM + alpha * aux``.
        norm_topk_prob: Renormalise the k selected router probabilities to sum to 1. Needed for
            exact upcycling (k identical experts then reproduce the dense FFN).
        router_mode: ``"token"``: the paper's router (eq. 3-4), logits ``W x``.
            ``"task"``: ``W x + b[task]`` with a learned per-task bias ``b`` (zero at
            initialisation), task ids passed as ``forward(task_ids=...)``.
        num_tasks: Rows of the per-task bias table (``len(skymoe.TASK_IDS)``).
        image_seq_length: Image tokens per image; derived from the vision config
            (``(image_size // patch_size) ** 2``, +1 with the ``"full"`` feature strategy) when
            ``None``; a different explicit value is an error.
        image_position_embedding: ``"none"`` (LLaVA, the default): image tokens carry only what
            the vision tower kept of where they are. ``"2d"``: the projector adds a learned
            column embedding (first half of the width) and row embedding (second half) to each
            projected patch token, initialised as sine/cosine codes of the patch centre on the
            0-100 box grid. The language model's RoPE only orders tokens; it cannot copy a
            patch's absolute place into an answer, so a tower that drops its position
            embeddings (one trained from scratch on position-free targets does) leaves the
            model unable to say where anything is. Needs the ``"default"`` feature strategy
            (no class token) and a text width that is a multiple of 4.
        image_after_question: Where the first user turn puts the image. ``False`` (LLaVA and
            GeoChat, the default): ``USER: <image>\n{question}``. ``True``:
            ``USER: {question}\n<image>``, so that each image token, under the causal mask,
            can read what is asked before the answer looks for it (train/README.md, the
            question-first oracle). A property of how the checkpoint was trained: prompts
            must be rendered the same way at inference.
        object_tokens: ``0`` (the paper, the default): the language model reads every patch.
            ``K > 0``: it reads ``object_context_grid ** 2`` pooled context tokens and the tokens
            of the ``K`` patches where a per-class centre heatmap head (``object_scorer``) peaks
            (:mod:`skymoe.object_tokens`); ``image_seq_length`` is then their sum. Needs
            ``object_classes`` and the ``"default"`` feature strategy.
        object_classes: Classes of the centre heatmap head (0 without object tokens).
        object_context_grid: Pooled context tokens per side with object tokens.
        object_codes: With object tokens, add to each one its detection (class and colour
            probabilities, box corner codes from the ``object_box_head`` and
            ``object_colour_head``) through a learned ``object_code_projection``
            (:func:`skymoe.object_tokens.detection_features`). Needs ``object_colours``.
        object_colours: Classes of the colour head (0 without object codes).
    """

    model_type = "skymoe"

    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "intermediate_size": 4096,
                "hidden_size": 1024,
                "patch_size": 14,
                "image_size": 504,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "vocab_size": 32000,
                "projection_dim": 768,
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    image_seq_length: int | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_layers: list[int] | None = None
    router_aux_loss_coef: float = 0.01
    norm_topk_prob: bool = True
    router_mode: Literal["token", "task"] = "token"
    num_tasks: int = NUM_TASKS
    image_position_embedding: Literal["none", "2d"] = "none"
    image_after_question: bool = False
    object_tokens: int = 0
    object_classes: int = 0
    object_context_grid: int = 3
    object_codes: bool = False
    object_colours: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        grid_tokens = self.image_grid_size**2 + (1 if self.vision_feature_select_strategy == "full" else 0)
        if self.object_tokens:
            grid_tokens = self.object_context_grid**2 + self.object_tokens
        if self.image_seq_length is None:
            self.image_seq_length = grid_tokens
        if self.image_seq_length != grid_tokens:
            raise SkyMoEConfigError(
                f"image_seq_length={self.image_seq_length} but the vision tower gives {grid_tokens} image tokens "
                f"({self.vision_config.image_size} px / {self.vision_config.patch_size} px patches, "
                f"object_tokens={self.object_tokens}); omit it to derive it"
            )
        if self.moe_layers is None:
            num_layers = self.text_config.num_hidden_layers
            self.moe_layers = default_moe_layers(num_layers) if self.num_experts > 1 else []
        self.moe_layers = sorted(int(i) for i in self.moe_layers)
        self._check_fields()

    @property
    def image_grid_size(self) -> int:
        """Patches per side of the (square) image: ``image_size // patch_size``."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def is_moe(self) -> bool:
        """True when at least one decoder layer is a MoE layer."""
        return len(self.moe_layers) > 0

    def _check_fields(self) -> None:
        """Check the MoE, task and image-position fields (called at the end of ``__post_init__``).

        Raises:
            SkyMoEConfigError: (a ``ValueError``) naming the bad field and value.
        """
        num_layers = self.text_config.num_hidden_layers
        if self.num_experts < 1:
            raise SkyMoEConfigError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.moe_layers and self.num_experts == 1:
            raise SkyMoEConfigError(
                f"moe_layers={self.moe_layers} needs num_experts >= 2; use moe_layers=[] for a dense model"
            )
        if self.moe_layers and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise SkyMoEConfigError(
                f"num_experts_per_tok must lie in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}"
            )
        bad = [i for i in self.moe_layers if not 0 <= i < num_layers]
        if bad:
            raise SkyMoEConfigError(
                f"moe_layers {bad} out of range: the language model has {num_layers} decoder layers "
                f"(valid indices 0..{num_layers - 1})"
            )
        if len(set(self.moe_layers)) != len(self.moe_layers):
            raise SkyMoEConfigError(f"moe_layers has duplicates: {self.moe_layers}")
        if self.image_position_embedding == "2d":
            if self.vision_feature_select_strategy != "default":
                raise SkyMoEConfigError(
                    'image_position_embedding="2d" codes the patch grid; it needs vision_feature_select_strategy='
                    f'"default" (no class token), got {self.vision_feature_select_strategy!r}'
                )
            if self.text_config.hidden_size % 4:
                raise SkyMoEConfigError(
                    'image_position_embedding="2d" splits the text width into sine/cosine halves for columns and '
                    f"rows; text_config.hidden_size must be a multiple of 4, got {self.text_config.hidden_size}"
                )
        if self.object_tokens:
            self._check_object_fields()
        if self.object_codes and (not self.object_tokens or self.object_colours < 1):
            raise SkyMoEConfigError(
                "object_codes adds each object token's detection: it needs object_tokens > 0 and "
                f"object_colours >= 1 (the colour head's classes), got object_tokens={self.object_tokens}, "
                f"object_colours={self.object_colours}"
            )
        if self.num_tasks < 1:
            raise SkyMoEConfigError(f"num_tasks must be >= 1, got {self.num_tasks}")
        if self.vision_config.image_size % self.vision_config.patch_size:
            raise SkyMoEConfigError(
                f"vision_config.image_size={self.vision_config.image_size} is not a multiple of "
                f"patch_size={self.vision_config.patch_size}"
            )

    def _check_object_fields(self) -> None:
        """Check the object-token fields (``object_tokens > 0``)."""
        patches = self.image_grid_size**2
        if not 0 < self.object_tokens <= patches:
            raise SkyMoEConfigError(
                f"object_tokens must lie in [1, {patches}] (the patches of the image), got {self.object_tokens}"
            )
        if self.object_classes < 1:
            raise SkyMoEConfigError(
                f"object_tokens={self.object_tokens} needs object_classes >= 1 (the centre heatmap's classes), "
                f"got {self.object_classes}"
            )
        if not 1 <= self.object_context_grid <= self.image_grid_size:
            raise SkyMoEConfigError(
                f"object_context_grid must lie in [1, {self.image_grid_size}], got {self.object_context_grid}"
            )
        if self.vision_feature_select_strategy != "default":
            raise SkyMoEConfigError(
                "object_tokens pick patches of the grid; they need vision_feature_select_strategy=\"default\" "
                f"(no class token), got {self.vision_feature_select_strategy!r}"
            )
