"""SkyMoE model classes: the transformers Llava ladder with MoE decoder layers.

``SkyMoEPreTrainedModel -> SkyMoEModel -> SkyMoEForConditionalGeneration`` extend the Llava
classes; the language model is a :class:`~transformers.LlamaModel` whose layers listed in
``config.moe_layers`` are :class:`SkyMoEDecoderLayer` (Llama's layer with its MLP swapped for a
:class:`~skymoe.moe.SkyMoESparseBlock`).
"""

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, LlamaModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration import SkyMoEConfig
from .moe import SkyMoESparseBlock, SkyMoETaskBias, load_balancing_loss, record_router_outputs
from .object_tokens import detection_feature_width, detection_features, object_image_tokens
from .position_codes import patch_grid_codes

__all__ = [
    "SkyMoECausalLMOutputWithPast",
    "SkyMoEDecoderLayer",
    "SkyMoEMultiModalProjector",
    "SkyMoETextModel",
    "SkyMoEPreTrainedModel",
    "SkyMoEModel",
    "SkyMoEForConditionalGeneration",
]

logger = logging.getLogger(__name__)


@dataclass
class SkyMoECausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""Llava's output plus the two loss terms.

    Attributes:
        loss: ``lm_loss + router_aux_loss_coef * aux_loss`` (``lm_loss`` alone for a dense model),
            when ``labels`` are given.
        lm_loss: Next-token cross-entropy over the label positions that are not ``-100``.
        aux_loss: Load-balancing loss (eq. 7-8, mean over MoE layers, padding masked);
            ``None`` without labels or for a dense model.
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class SkyMoEDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose FFN is a :class:`~skymoe.moe.SkyMoESparseBlock`.

    ``forward`` is overridden only to hand ``task_ids`` to the MoE block: Llama's forward calls
    ``self.mlp(hidden_states)`` with no way to pass them. Attention and norms are Llama's own.
    """

    def __init__(self, config: SkyMoEConfig, layer_idx: int):
        super().__init__(config.text_config, layer_idx)
        self.mlp = SkyMoESparseBlock(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Pre-norm attention then pre-norm MoE, both residual (paper eq. 1).

        Args:
            hidden_states: ``(batch, seq, hidden_size)``.
            task_ids: ``(batch,)`` task ids for the task-aware router, or ``None``.
            **kwargs: Llama's decoder-layer arguments (masks, rotary embeddings, cache, ...).

        Returns:
            ``(batch, seq, hidden_size)``.
        """
        residual = hidden_states
        attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + attn_out
        moe_out = self.mlp(self.post_attention_layernorm(hidden_states), task_ids=task_ids)
        return hidden_states + moe_out


class SkyMoETextModel(LlamaModel):
    """Llama decoder stack with MoE layers at ``config.moe_layers``.

    Built from the whole :class:`SkyMoEConfig` (its ``text_config`` becomes this model's config).
    ``task_ids`` reach every decoder layer through the forward ``**kwargs``; dense layers ignore them.
    """

    _no_split_modules = ["LlamaDecoderLayer", "SkyMoEDecoderLayer"]

    def __init__(self, config: SkyMoEConfig):
        super().__init__(config.text_config)
        for layer_idx in config.moe_layers:
            self.layers[layer_idx] = SkyMoEDecoderLayer(config, layer_idx)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Llama's init, plus a zero per-task router bias (so task routing starts as token routing)."""
        super()._init_weights(module)
        if isinstance(module, SkyMoETaskBias):
            init.zeros_(module.weight)


class SkyMoEMultiModalProjector(LlavaMultiModalProjector):
    """Llava's 2-layer MLP projector, plus 2-D patch position embeddings when the config asks.

    With ``image_position_embedding="2d"`` each projected patch token gets ``column[c]`` in the
    first half of its width and ``row[r]`` in the second (see :class:`SkyMoEConfig`); the
    patches come row-major, row 0 at the top of the image.
    """

    def __init__(self, config: SkyMoEConfig):
        super().__init__(config)
        self.position_embedding = config.image_position_embedding
        if self.position_embedding == "2d":
            side, half = config.image_grid_size, config.text_config.hidden_size // 2
            # Parameters of this module, not nn.Embedding children: the init below must run after
            # (not be overwritten by) the generic embedding init.
            self.column_embedding = nn.Parameter(torch.empty(side, half))
            self.row_embedding = nn.Parameter(torch.empty(side, half))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """``(num_images, grid_size**2, vision width)`` -> ``(num_images, grid_size**2, text width)``."""
        tokens = super().forward(image_features)
        if self.position_embedding == "2d":
            side, half = self.column_embedding.shape
            columns = self.column_embedding[None, :, :].expand(side, side, half)
            rows = self.row_embedding[:, None, :].expand(side, side, half)
            tokens = tokens + torch.cat([columns, rows], dim=-1).reshape(side * side, 2 * half).to(tokens.dtype)
        return tokens


class SkyMoEPreTrainedModel(LlavaPreTrainedModel):
    """Base class binding :class:`SkyMoEConfig` to the Llava pre-trained-model machinery."""

    config: SkyMoEConfig
    _no_split_modules = ["LlamaDecoderLayer", "SkyMoEDecoderLayer", "CLIPEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Llava's init; 2-D patch position embeddings start as sine/cosine codes of the patch centres."""
        super()._init_weights(module)
        if isinstance(module, SkyMoEMultiModalProjector) and module.position_embedding == "2d":
            codes = patch_grid_codes(*module.column_embedding.shape)
            init.copy_(module.column_embedding, codes)
            init.copy_(module.row_embedding, codes)


class SkyMoEModel(SkyMoEPreTrainedModel, LlavaModel):
    """Vision tower + projector + MoE language model, without the LM head."""

    def __init__(self, config: SkyMoEConfig):
        # LlavaModel.__init__ would build a dense language model through AutoModel; build ours instead.
        super(LlavaModel, self).__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = SkyMoEMultiModalProjector(config)
        self.language_model = SkyMoETextModel(config)
        width = config.text_config.hidden_size
        if config.object_tokens:
            self.object_scorer = nn.Linear(width, config.object_classes)
        if config.object_codes:
            self.object_box_head = nn.Linear(width, 4)
            self.object_colour_head = nn.Linear(width, config.object_colours)
            self.object_code_projection = nn.Linear(
                detection_feature_width(config.object_classes, config.object_colours), width, bias=False)
        # (images, image_seq_length) patch of each image token of the last forward with images,
        # -1 for context tokens (object tokens only; skymoe.capture_routing reads it)
        self.last_image_patches: torch.Tensor | None = None
        self.post_init()

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected tokens of every patch, ``(images, grid_size**2, text width)``, row-major."""
        return torch.stack(list(LlavaModel.get_image_features(self, pixel_values=pixel_values).pooler_output))

    def get_image_features(self, pixel_values: torch.Tensor, *args, **kwargs):
        """Llava's image features; with ``object_tokens`` the context and object tokens instead
        (:func:`skymoe.object_tokens.object_image_tokens`), with ``object_codes`` plus each
        object's projected detection."""
        outputs = super().get_image_features(pixel_values, *args, **kwargs)
        if self.config.object_tokens:
            grid = torch.stack(list(outputs.pooler_output))
            centre_logits = self.object_scorer(grid)
            tokens, self.last_image_patches = object_image_tokens(
                grid, centre_logits, self.config.object_tokens, self.config.object_context_grid)
            if self.config.object_codes:
                tokens = tokens + self._detection_tokens(grid, centre_logits, self.last_image_patches)
            outputs.pooler_output = list(tokens)
        return outputs

    def _detection_tokens(self, grid: torch.Tensor, centre_logits: torch.Tensor,
                          token_patches: torch.Tensor) -> torch.Tensor:
        """``(images, image_seq_length, width)``: each filled object slot's projected detection, zeros elsewhere."""
        slots = token_patches[:, self.config.object_context_grid ** 2:]
        with torch.no_grad():  # a reading of the detector heads: it trains neither them nor the tower
            features = detection_features(centre_logits, self.object_box_head(grid), self.object_colour_head(grid),
                                          slots.clamp(min=0))
        codes = self.object_code_projection(features.to(self.object_code_projection.weight.dtype))
        codes = codes * (slots >= 0).unsqueeze(-1).to(codes.dtype)
        return F.pad(codes, (0, 0, self.config.object_context_grid ** 2, 0))


class SkyMoEForConditionalGeneration(SkyMoEPreTrainedModel, LlavaForConditionalGeneration):
    """SkyMoE with its LM head: Llava's forward plus ``task_ids`` and the auxiliary loss."""

    def __init__(self, config: SkyMoEConfig):
        # LlavaForConditionalGeneration.__init__ would build a LlavaModel; build a SkyMoEModel instead.
        super(LlavaForConditionalGeneration, self).__init__(config)
        self.model = SkyMoEModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        task_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> SkyMoECausalLMOutputWithPast:
        """Llava's forward, routing with ``task_ids`` and adding ``alpha * aux`` to the LM loss.

        Args:
            input_ids: ``(batch, seq)`` token ids; each image is ``image_seq_length`` image tokens.
            pixel_values: ``(num_images, 3, image_size, image_size)`` normalised pixels.
            attention_mask: ``(batch, seq)``, 0 on padding (also masks padding out of the aux loss).
            position_ids: ``(batch, seq)``; ``generate`` derives them from the attention mask.
            cache: KV cache for incremental decoding (transformers >= 5.25 calls it ``cache``,
                ``past_key_values`` before).
            inputs_embeds: ``(batch, seq, hidden_size)`` instead of ``input_ids``.
            labels: ``(batch, seq)`` targets, ``-100`` where no loss is taken (prompt, image, padding).
            logits_to_keep: Keep only the last N positions' logits (0 = all).
            task_ids: ``(batch,)`` int64 index into ``skymoe.TASK_IDS`` (``-1`` = unknown) for
                ``router_mode="task"``; ignored by the token router.
            **kwargs: Passed to Llava's forward (e.g. ``vision_feature_layer``, ``use_cache``).

        Returns:
            :class:`SkyMoECausalLMOutputWithPast` with ``logits (batch, seq, vocab)`` and, when
            ``labels`` are given, ``loss``, ``lm_loss`` and ``aux_loss``.
        """
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        task_ids = self._checked_task_ids(task_ids, batch_size)
        want_aux = labels is not None and self.config.is_moe
        with record_router_outputs(self) if want_aux else nullcontext({}) as routing:
            outputs = super().forward(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                logits_to_keep=logits_to_keep,
                task_ids=task_ids,
                **kwargs,
            )
        lm_loss, aux_loss, loss = outputs.loss, None, outputs.loss
        if want_aux:
            aux_loss = self._aux_loss(routing, attention_mask)
            loss = lm_loss + self.config.router_aux_loss_coef * aux_loss.to(lm_loss.device)
        return SkyMoECausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )

    def _checked_task_ids(self, task_ids: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """Validate ``task_ids``: shape ``(batch,)``, integers in ``[-1, num_tasks)``.

        The value check must not sync with the host on an accelerator or inside a compiled graph
        (it runs at every decoding step): there it is an asynchronous device assert; on eager CPU
        tensors it raises a ValueError naming the bad ids.
        """
        if task_ids is None:
            return None
        task_ids = torch.as_tensor(task_ids, dtype=torch.long)
        if task_ids.ndim != 1 or task_ids.shape[0] != batch_size:
            raise ValueError(f"task_ids must have shape (batch,) = ({batch_size},), got {tuple(task_ids.shape)}")
        out_of_range = (task_ids < -1) | (task_ids >= self.config.num_tasks)
        message = f"task_ids out of range: use -1 (unknown) or 0..{self.config.num_tasks - 1} (the index in skymoe.TASK_IDS)"
        if torch.compiler.is_compiling() or task_ids.device.type != "cpu":
            torch._assert_async(~out_of_range.any(), message)
        elif out_of_range.any():
            raise ValueError(f"{message}; got {task_ids[out_of_range].tolist()}")
        return task_ids

    def _aux_loss(self, routing: dict, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Eq. 7-8 loss from the recorded router outputs of one forward, padding masked out."""
        probs = [torch.cat([r.probs for r in routing[idx]]) for idx in sorted(routing)]
        token_mask = None
        if attention_mask is not None and attention_mask.ndim == 2:
            token_mask = attention_mask.reshape(-1)
            if token_mask.numel() != probs[0].shape[0]:  # cached decoding: only the newest positions
                seq = probs[0].shape[0] // attention_mask.shape[0]
                token_mask = attention_mask[:, -seq:].reshape(-1)
        return load_balancing_loss(probs, self.config.num_experts, token_mask)
