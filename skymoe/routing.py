"""Routing capture: which experts handled which tokens and which image patches.

``with capture_routing(model) as trace: model.generate(...)`` records, per MoE layer, each
token's router probabilities and top-k experts (forward hooks on the routers, removed on exit),
plus each call's input ids, attention mask and whether it carried images. Image tokens are
mapped back to the vision patch grid (row-major, ``grid x grid`` patches per image) so
:meth:`RoutingTrace.expert_heatmaps` can draw one map per expert over the tile.

Not thread-safe: do not run other forwards on the same model while a trace is open.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .moe import RouterOutput, SkyMoERouter

__all__ = ["LayerRouting", "RoutingTrace", "capture_routing"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRouting:
    """Router decisions of one MoE layer for every token seen inside the trace.

    Attributes:
        probs: ``(tokens, num_experts)`` float32 router probabilities (CPU).
        topk: ``(tokens, k)`` int64 selected experts, most probable first.
        token_mask: ``(tokens,)`` bool, False for padding.
    """

    probs: torch.Tensor
    topk: torch.Tensor
    token_mask: torch.Tensor


@dataclass
class _Call:
    """Token bookkeeping of one forward call, tokens flattened batch-major ``(batch * seq,)``."""

    sample_index: torch.Tensor  # (tokens,) sample number across the trace
    patch_index: torch.Tensor  # (tokens,) patch number in the image grid, -1 for text (and context) tokens
    token_mask: torch.Tensor  # (tokens,) bool


@dataclass
class RoutingTrace:
    """Routing recorded by :func:`capture_routing` (filled while the context is open).

    Samples are numbered in order across calls; the decoding steps of ``generate`` (calls
    without images whose batch size matches the previous call) continue the previous samples.

    Attributes:
        moe_layers: Sorted MoE layer indices.
        num_experts: E.
        grid_size: ``(grid_h, grid_w)`` patches per image side.
        image_token_id: Id of the image placeholder token.
    """

    moe_layers: list[int]
    num_experts: int
    grid_size: tuple[int, int]
    image_token_id: int
    _records: dict[int, list[RouterOutput]] = field(default_factory=dict, repr=False)
    _calls: list[_Call] = field(default_factory=list, repr=False)
    _samples_seen: int = field(default=0, repr=False)
    _last_batch: tuple[int, int] | None = field(default=None, repr=False)  # (offset, batch) of the last call

    @property
    def layers(self) -> dict[int, LayerRouting]:
        """``{layer_idx: LayerRouting}`` over all tokens of all recorded calls."""
        mask = self.token_mask
        return {idx: LayerRouting(*self._stacked(idx), token_mask=mask) for idx in self.moe_layers}

    def _stacked(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs (tokens, E), topk (tokens, k))`` of one layer, concatenated over calls."""
        records = self._records.get(layer_idx, [])
        if not records:
            return torch.empty(0, self.num_experts), torch.empty(0, 0, dtype=torch.long)
        return torch.cat([r.probs for r in records]), torch.cat([r.top_k_index for r in records])

    @property
    def token_mask(self) -> torch.Tensor:
        """``(tokens,)`` bool, False on padding."""
        return torch.cat([c.token_mask for c in self._calls]) if self._calls else torch.empty(0, dtype=torch.bool)

    @property
    def sample_index(self) -> torch.Tensor:
        """``(tokens,)`` int64 sample number of each token."""
        return torch.cat([c.sample_index for c in self._calls]) if self._calls else torch.empty(0, dtype=torch.long)

    @property
    def patch_index(self) -> torch.Tensor:
        """``(tokens,)`` int64 row-major patch number of image tokens, ``-1`` for the others."""
        return torch.cat([c.patch_index for c in self._calls]) if self._calls else torch.empty(0, dtype=torch.long)

    def expert_heatmaps(self, sample: int = 0) -> np.ndarray:
        """Share of a sample's image patches routed (top-k) to each expert, on the patch grid.

        Args:
            sample: Sample number (row of the first batch is 0).

        Returns:
            ``(num_moe_layers, num_experts, grid_h, grid_w)`` float32 in ``[0, 1]``: for one
            image, 1 where the expert is among the patch's top-k, else 0 (averaged when the
            sample's image was seen several times). Each patch sums to k over experts.

        Raises:
            ValueError: If no image token of ``sample`` was recorded.
        """
        grid_h, grid_w = self.grid_size
        patches = self.patch_index
        selected = (self.sample_index == sample) & (patches >= 0)
        if not bool(selected.any()):
            raise ValueError(
                f"no image tokens recorded for sample {sample}: run a forward with pixel_values inside the trace "
                "(a model with object tokens records none for an image where no object was detected)"
            )
        cells = patches[selected] % (grid_h * grid_w)  # (n,) patch cell
        seen = torch.bincount(cells, minlength=grid_h * grid_w).clamp(min=1).float()  # (cells,)
        maps = np.zeros((len(self.moe_layers), self.num_experts, grid_h, grid_w), dtype=np.float32)
        for row, routing in enumerate(self.layers.values()):
            topk = routing.topk[selected]  # (n, k)
            hits = torch.zeros(self.num_experts, grid_h * grid_w)
            for slot in range(topk.shape[1]):
                hits.index_put_((topk[:, slot], cells), torch.ones(cells.shape[0]), accumulate=True)
            maps[row] = (hits / seen).reshape(self.num_experts, grid_h, grid_w).numpy()
        return maps

    def expert_load(self) -> np.ndarray:
        """``(num_moe_layers, num_experts)`` share of top-k assignments of real tokens per expert (rows sum to 1)."""
        load = np.zeros((len(self.moe_layers), self.num_experts), dtype=np.float32)
        for row, routing in enumerate(self.layers.values()):
            chosen = routing.topk[routing.token_mask].reshape(-1)
            if chosen.numel():
                load[row] = (torch.bincount(chosen, minlength=self.num_experts).float() / chosen.numel()).numpy()
        return load

    def _place_object_tokens(self, patches: torch.Tensor) -> None:
        """Give the last call's image tokens the patches they stand for (a model with object tokens).

        ``patches``: ``(images, image_seq_length)`` (``SkyMoEModel.last_image_patches``), the
        image tokens in the order they fill the batch's image positions, ``-1`` for context tokens.
        """
        call = self._calls[-1]
        is_image = call.patch_index >= 0
        flat = patches.reshape(-1).cpu()
        if int(is_image.sum()) == flat.numel():
            call.patch_index = call.patch_index.masked_scatter(is_image, flat)

    def _on_call(
        self,
        input_ids: torch.Tensor | None,
        embeds: torch.Tensor | None,
        mask: torch.Tensor | None,
        has_images: bool,
    ) -> None:
        """Book-keep one forward call's tokens (called by the pre-forward hook)."""
        shape = input_ids.shape if input_ids is not None else embeds.shape[:2]
        batch, seq = int(shape[0]), int(shape[1])
        if not has_images and self._last_batch is not None and self._last_batch[1] == batch:
            offset = self._last_batch[0]  # a decoding step of the previous samples
        else:
            offset = self._samples_seen
            self._samples_seen += batch
        self._last_batch = (offset, batch)
        if mask is None or mask.ndim != 2:
            token_mask = torch.ones(batch, seq, dtype=torch.bool)
        else:
            token_mask = mask[:, -seq:].bool().cpu()  # the newest `seq` positions
        patch = torch.full((batch, seq), -1, dtype=torch.long)
        if has_images and input_ids is not None:
            is_image = (input_ids == self.image_token_id).cpu()  # (batch, seq)
            order = torch.cumsum(is_image.long(), dim=1) - 1  # k-th image token of its row
            patch = torch.where(is_image, order, patch)
        samples = (offset + torch.arange(batch)).unsqueeze(1).expand(batch, seq)
        self._calls.append(_Call(samples.reshape(-1), patch.reshape(-1), token_mask.reshape(-1)))


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[RoutingTrace]:
    """Record routing of every forward of ``model`` (including ``generate`` steps) inside the context.

    Args:
        model: A :class:`~skymoe.SkyMoEForConditionalGeneration` with MoE layers.

    Yields:
        A :class:`RoutingTrace`, filled as forwards run; hooks are removed on exit.

    Raises:
        ValueError: If the model has no MoE layer.
    """
    routers = [m for m in model.modules() if isinstance(m, SkyMoERouter)]
    if not routers:
        raise ValueError("capture_routing needs a model with MoE layers; this model is dense (moe_layers=[])")
    config = model.config
    grid = config.image_grid_size
    trace = RoutingTrace(
        moe_layers=sorted(r.layer_idx for r in routers),
        num_experts=config.num_experts,
        grid_size=(grid, grid),
        image_token_id=config.image_token_index,
    )

    def _before_forward(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        has_images = kwargs.get("pixel_values") is not None
        trace._on_call(input_ids, kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), has_images)

    def _after_forward(_module: nn.Module, _args: tuple, kwargs: dict, _output) -> None:
        if config.object_tokens and kwargs.get("pixel_values") is not None:
            trace._place_object_tokens(model.model.last_image_patches)

    def _after_router(module: SkyMoERouter, _args: tuple, output: RouterOutput) -> None:
        tensors = (output.logits, output.probs, output.top_k_weights, output.top_k_index)
        trace._records.setdefault(module.layer_idx, []).append(RouterOutput(*(t.detach().cpu() for t in tensors)))

    handles = [model.register_forward_pre_hook(_before_forward, with_kwargs=True),
               model.register_forward_hook(_after_forward, with_kwargs=True)]
    handles += [r.register_forward_hook(_after_router) for r in routers]
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()
