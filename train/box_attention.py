"""Box-attention supervision: teach one attention head to look at the object whose box is being written.

Why: a small SkyMoE trained from scratch learns box sizes but not places. Its attention from the
positions that write a box's coordinates to the image patches is spread almost as if at random
(the target's patches get at most about twice their share; README, known limits), so no position
information can reach the answer. Learning that retrieval only
from the few coordinate tokens is a chicken-and-egg problem: looking at the right patch pays
only once the coordinates can be read from it, and the other way round.

This auxiliary loss breaks the loop. For every box ``{<x1><y1><x2><y2>|<angle>}`` in an answer,
the positions that predict ``x1``, ``y1``, ``x2`` and ``y2`` (the token before each) of one head
(``layer``, ``head``) are pushed to attend to the image patches the box overlaps:
``-log(sum of that head's attention on those patches)``, averaged over the supervised
positions. The loss reads its targets from the batch's ``input_ids`` and ``labels`` (boxes in
answer tokens only), so the data pipeline is unchanged. Inference is unchanged too: the head
is an ordinary head of the model.

The model keeps its fast attention kernel (which returns no weights): a hook keeps the
supervised layer's input, and the loss recomputes that one head's attention rows at the
supervised positions only (Llama attention: q/k projections of the head, RoPE, causal softmax;
:meth:`BoxAttentionLoss.head_weights`). It needs a tokenizer whose grid values ``<0>`` ..
``<100>`` are single tokens (:mod:`skymoe.tokenization`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from skymoe.tokenization import GRID_TOKENS

__all__ = ["BoxAttentionSettings", "BoxAttentionLoss", "box_patch_mask", "supervising", "plus_box_attention"]

#: Coordinates per box: x1, y1, x2, y2 on the 0-100 grid.
_BOX_VALUES = 4


@dataclass
class BoxAttentionSettings:
    """Which head is supervised, and how strongly.

    Attributes:
        coef: weight of the loss in the optimised total (0 switches it off).
        layer: decoder layer (0-based) of the supervised head.
        head: attention head within that layer.
    """

    coef: float = 0.0
    layer: int = 2
    head: int = 0


def box_patch_mask(box: tuple[float, float, float, float], grid_size: int) -> torch.Tensor:
    """Patches a box overlaps, ``(grid_size * grid_size,)`` bool, row-major (row 0 at the top).

    Args:
        box: ``(x1, y1, x2, y2)`` on the 0-100 grid (x right, y down; integers in answers,
            fractions in Stage 0's targets). A degenerate box still marks the patch its corner
            lies in.
        grid_size: patches per image side; patch ``c`` spans ``[c, c + 1) * 100 / grid_size``.
    """
    x1, y1, x2, y2 = box
    edges = torch.arange(grid_size + 1, dtype=torch.float32) * 100 / grid_size
    # a zero-width box is widened by half a grid unit so it still lies in one patch
    cols = (edges[1:] > x1) & (edges[:-1] < max(x2, x1 + 0.5))
    rows = (edges[1:] > y1) & (edges[:-1] < max(y2, y1 + 0.5))
    return (rows[:, None] & cols[None, :]).reshape(-1)


class BoxAttentionLoss:
    """The auxiliary loss of the module docstring, for one model and tokenizer.

    Use::

        box_loss = BoxAttentionLoss(model, tokenizer, BoxAttentionSettings(coef=1.0))
        with box_loss.attached():
            out = model(**batch)
            loss = out.loss + box_loss.coef * box_loss(batch["input_ids"], batch["labels"])

    Raises:
        ValueError: the layer or head does not exist, or the tokenizer splits grid values.
    """

    def __init__(self, model, tokenizer, settings: BoxAttentionSettings):
        text = model.config.text_config
        if not 0 <= settings.layer < text.num_hidden_layers:
            raise ValueError(f"box attention layer {settings.layer} does not exist: the model has "
                             f"{text.num_hidden_layers} decoder layers (0-based)")
        if not 0 <= settings.head < text.num_attention_heads:
            raise ValueError(f"box attention head {settings.head} does not exist: layer {settings.layer} "
                             f"has {text.num_attention_heads} heads (0-based)")
        vocab = tokenizer.get_vocab()
        missing = [t for t in ("{", *GRID_TOKENS) if t not in vocab]
        if missing:
            raise ValueError(f"box attention supervision needs '{{' and the grid values <0>..<100> as single "
                             f"tokens; this tokenizer lacks {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                             "(use skymoe.tokenization.build_tokenizer, or set its coef to 0)")
        self.settings, self.coef = settings, settings.coef
        self.open_id = vocab["{"]
        self.grid_value = {vocab[token]: value for value, token in enumerate(GRID_TOKENS)}
        self.image_token_id = model.config.image_token_id
        self.grid_size = model.config.image_grid_size
        self.attention = model.model.language_model.layers[settings.layer].self_attn
        self._inputs: tuple | None = None

    @contextlib.contextmanager
    def attached(self) -> Iterator[BoxAttentionLoss]:
        """Keep the supervised layer's input of every forward pass made inside this block."""
        handle = self.attention.register_forward_pre_hook(self._keep_inputs, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()
            self._inputs = None

    def _keep_inputs(self, module, args, kwargs) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._inputs = (hidden, kwargs["position_embeddings"])

    def _take_inputs(self) -> tuple:
        """The captured layer input, used once."""
        if self._inputs is None:
            raise RuntimeError("no attention input captured: run the model inside BoxAttentionLoss.attached()")
        inputs, self._inputs = self._inputs, None
        return inputs

    def head_weights(self, queries: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The supervised head's attention over keys ``0 .. query`` at each ``(row, query)``, float32.

        What Llama's attention computes for that head (before attention dropout), from the
        layer input the last forward pass left: ``softmax(q . k * scaling)`` with RoPE on q and
        k and the causal mask (right padding never precedes a query, so no other mask applies).

        Raises:
            RuntimeError: no forward pass ran inside :meth:`attached` since the last call.
        """
        hidden, (cos, sin) = self._take_inputs()
        attention = self.attention
        size, head = attention.head_dim, self.settings.head
        kv_head = head // attention.num_key_value_groups  # grouped-query attention shares key heads

        def project(linear: torch.nn.Linear, index: int) -> torch.Tensor:
            rows = slice(index * size, (index + 1) * size)
            bias = linear.bias[rows] if linear.bias is not None else None
            return F.linear(hidden, linear.weight[rows], bias)[:, None]  # (batch, 1, seq, head_dim)

        q, k = apply_rotary_pos_emb(project(attention.q_proj, head), project(attention.k_proj, kv_head), cos, sin)
        q, k = q[:, 0].float(), k[:, 0].float()
        return [torch.softmax(k[row, : query + 1] @ q[row, query] * attention.scaling, dim=0) for row, query in queries]

    def targets(self, input_ids: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """``(row, query position, patch mask)`` for each supervised position of the batch.

        A box counts when its ``{`` is followed by four grid values that are answer tokens
        (``labels`` not -100), so boxes the user wrote in a question are not supervised.
        """
        found = []
        ids, answer = input_ids.tolist(), (labels != -100).tolist()
        for row, (tokens, is_answer) in enumerate(zip(ids, answer)):
            for t in range(len(tokens) - _BOX_VALUES):
                span = range(t + 1, t + 1 + _BOX_VALUES)
                if tokens[t] != self.open_id or not all(tokens[i] in self.grid_value and is_answer[i] for i in span):
                    continue
                box = tuple(self.grid_value[tokens[i]] for i in span)
                mask = box_patch_mask(box, self.grid_size)
                found.extend((row, query, mask) for query in range(t, t + _BOX_VALUES))
        return found

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor,
                 image_patches: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The loss of the last forward pass (zero when the batch has no box in an answer).

        Args:
            input_ids / labels: the batch the model just ran.
            image_patches: per row, the row-major patch index of each of its image tokens, for
                inputs that carry only some patches (:mod:`train.oracle_tokens`); None: every
                row has all ``grid_size ** 2`` patches in order.

        Raises:
            RuntimeError: no forward pass ran inside :meth:`attached` since the last call.
        """
        found = self.targets(input_ids.cpu(), labels.cpu())
        if not found:
            self._take_inputs()
            return torch.zeros((), device=input_ids.device)
        weights = self.head_weights([(row, query) for row, query, _ in found])
        is_image = input_ids == self.image_token_id
        terms = []
        for (row, query, mask), over_keys in zip(found, weights):
            on_image = over_keys[is_image[row, : query + 1]]  # one weight per image token, in order
            if image_patches is not None:
                mask = mask[image_patches[row]]
            if mask.any():
                terms.append(-torch.log(on_image[mask.to(on_image.device)].sum() + 1e-6))
        if not terms:  # every box lies on patches the rows do not carry
            return torch.zeros((), device=input_ids.device)
        return torch.stack(terms).mean()


def supervising(box_attention: BoxAttentionLoss | None) -> contextlib.AbstractContextManager:
    """``box_attention.attached()``, or a block that does nothing when there is no such loss."""
    return box_attention.attached() if box_attention is not None else contextlib.nullcontext()


def plus_box_attention(loss: torch.Tensor, batch: dict[str, torch.Tensor],
                       box_attention: BoxAttentionLoss | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss + coef * box-attention loss, box-attention loss)`` of the forward pass just made on
    ``batch`` inside :func:`supervising`; ``(loss, None)`` when there is no such loss."""
    if box_attention is None:
        return loss, None
    box = box_attention(batch["input_ids"], batch["labels"])
    return loss + box_attention.coef * box, box
