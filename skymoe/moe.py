"""Mixture-of-Experts parts: router, sparse expert block, load-balancing loss, router recording.

Equations refer to the SkyMoE paper (``../shared/paper``): eq. 3 (softmax router),
eq. 4 (weighted sum of the top-k experts), eq. 7-8 (auxiliary load-balancing loss).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP

from .configuration import SkyMoEConfig

__all__ = [
    "RouterOutput",
    "SkyMoERouter",
    "SkyMoETaskBias",
    "SkyMoESparseBlock",
    "load_balancing_loss",
    "record_router_outputs",
]

logger = logging.getLogger(__name__)


@dataclass
class RouterOutput:
    """What a router computed for a flat batch of tokens (all float32).

    Attributes:
        logits: ``(tokens, num_experts)`` router logits ``W x`` (+ task bias).
        probs: ``(tokens, num_experts)`` softmax of the logits (eq. 3).
        top_k_weights: ``(tokens, k)`` mixing weights of the selected experts, renormalised to
            sum to 1 when ``norm_topk_prob`` (otherwise the raw probabilities, eq. 4).
        top_k_index: ``(tokens, k)`` int64 selected expert ids, most probable first.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    top_k_weights: torch.Tensor
    top_k_index: torch.Tensor


class SkyMoETaskBias(nn.Embedding):
    """``(num_tasks, num_experts)`` table of router-logit biases, one row per task (zero-initialised)."""


class SkyMoERouter(nn.Module):
    """Linear token router computed in float32, with an optional per-task bias.

    ``router_mode="token"``: logits ``W x`` (paper eq. 3). ``router_mode="task"``: logits
    ``W x + b[task]`` where ``b`` is a :class:`SkyMoETaskBias` ``nn.Embedding(num_tasks, E)`` initialised to zero,
    so a freshly upcycled model routes exactly like the token router. A task id of ``-1``
    (or ``task_index=None``) adds no bias.
    """

    def __init__(self, config: SkyMoEConfig, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.text_config.hidden_size, config.num_experts, bias=False)
        self.task_bias = SkyMoETaskBias(config.num_tasks, config.num_experts) if config.router_mode == "task" else None

    def forward(self, hidden_states: torch.Tensor, task_index: torch.Tensor | None = None) -> RouterOutput:
        """Route a flat batch of tokens.

        Args:
            hidden_states: ``(tokens, hidden_size)`` in any float dtype.
            task_index: ``(tokens,)`` int64 task id per token (``-1`` = no bias), or ``None``.

        Returns:
            The :class:`RouterOutput`, every tensor float32 except the int64 indices.
        """
        logits = F.linear(hidden_states.float(), self.gate.weight.float())  # (tokens, E)
        if self.task_bias is not None and task_index is not None:
            known = (task_index >= 0).unsqueeze(-1)  # (tokens, 1)
            bias = self.task_bias(task_index.clamp(min=0)).float()  # (tokens, E)
            logits = logits + bias * known
        probs = torch.softmax(logits, dim=-1)  # eq. 3
        top_k_probs, top_k_index = torch.topk(probs, self.top_k, dim=-1)  # (tokens, k)
        if self.norm_topk_prob:
            top_k_probs = top_k_probs / top_k_probs.sum(dim=-1, keepdim=True)
        return RouterOutput(logits=logits, probs=probs, top_k_weights=top_k_probs, top_k_index=top_k_index)


class SkyMoESparseBlock(nn.Module):
    """Top-k mixture of Llama FFN experts replacing a decoder layer's MLP (paper eq. 4).

    Experts are an ``nn.ModuleList`` of :class:`~transformers.models.llama.modeling_llama.LlamaMLP`
    (three ``nn.Linear`` each), so bitsandbytes and peft LoRA apply to them as to any Linear.
    Tokens are grouped per expert and only the selected experts run on only their tokens;
    an expert that received no token does not run. No token is dropped, no noise is added.
    """

    def __init__(self, config: SkyMoEConfig, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.top_k = config.num_experts_per_tok
        self.router = SkyMoERouter(config, layer_idx)
        self.experts = nn.ModuleList([LlamaMLP(config.text_config) for _ in range(config.num_experts)])

    def forward(self, hidden_states: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mix the top-k experts per token.

        Args:
            hidden_states: ``(batch, seq, hidden_size)``.
            task_ids: ``(batch,)`` int64 task ids for ``router_mode="task"`` (``-1`` = none), or ``None``.

        Returns:
            ``(batch, seq, hidden_size)``, same dtype as the input.
        """
        B, T, D = hidden_states.shape
        flat = hidden_states.reshape(B * T, D)  # (tokens, D)
        task_index = task_ids.to(flat.device).repeat_interleave(T) if task_ids is not None else None  # (tokens,)
        routing = self.router(flat, task_index)
        return self._mix_experts(flat, routing).reshape(B, T, D)

    def _mix_experts(self, flat: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """Run each selected expert once on its own tokens and scatter-add the weighted outputs.

        Args:
            flat: ``(tokens, hidden_size)`` token states.
            routing: The router's decision for these tokens.

        Returns:
            ``(tokens, hidden_size)`` the weighted sum of the k expert outputs per token.
        """
        expert_of_slot = routing.top_k_index.reshape(-1)  # (tokens * k,)
        order = torch.argsort(expert_of_slot, stable=True)  # slots grouped by expert
        token_of_slot = order // self.top_k  # (tokens * k,) token row of each sorted slot
        weight_of_slot = routing.top_k_weights.reshape(-1)[order]  # (tokens * k,)
        counts = torch.bincount(expert_of_slot, minlength=len(self.experts)).tolist()
        output = torch.zeros_like(flat)
        tokens_per_expert = token_of_slot.split(counts)
        weights_per_expert = weight_of_slot.split(counts)
        for expert, token_idx, weights in zip(self.experts, tokens_per_expert, weights_per_expert, strict=True):
            if token_idx.numel() == 0:
                continue  # experts without tokens never run
            expert_out = expert(flat.index_select(0, token_idx))  # (n_e, D)
            output.index_add_(0, token_idx, (expert_out * weights.unsqueeze(-1)).to(flat.dtype))
        return output


def load_balancing_loss(
    router_probs: Sequence[torch.Tensor],
    num_experts: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Auxiliary load-balancing loss of the SkyMoE paper, eq. 7-8, averaged over MoE layers.

    Per MoE layer: :math:`L = E \sum_i F_i G_i` with :math:`F_i` the fraction of (non-padding)
    tokens whose top-1 expert (argmax of the router probabilities) is expert ``i``, and
    :math:`G_i` the mean router probability of expert ``i`` over the same tokens. A perfectly
    balanced router gives :math:`F_i = G_i = 1/E` and :math:`L = 1`; total collapse on one
    expert gives :math:`L = E`.

    Layers are combined by the MEAN, not the sum: the mean reads about 1 for a balanced router
    whatever the number of MoE layers (the sum would read 16 for Vicuna-7B's 16 MoE layers and
    change with depth), so ``alpha`` keeps its meaning when the layer count changes.
    Only :math:`G` carries gradient (:math:`F` is a count), as in the paper and Switch Transformer.

    Args:
        router_probs: One ``(tokens, num_experts)`` float tensor per MoE layer (softmax outputs).
        num_experts: ``E``.
        token_mask: ``(tokens,)`` bool/int, 1 for real tokens and 0 for padding (the flattened
            ``(batch, seq)`` attention mask); ``None`` counts every token.

    Returns:
        A scalar float32 tensor.

    Raises:
        ValueError: If ``router_probs`` is empty or a mask length does not match the token count.
    """
    if len(router_probs) == 0:
        raise ValueError("load_balancing_loss needs router probabilities of at least one MoE layer, got none")
    per_layer = []
    for probs in router_probs:
        probs = probs.float()  # (tokens, E)
        if token_mask is None:
            weight = torch.ones(probs.shape[0], device=probs.device)
        else:
            if token_mask.numel() != probs.shape[0]:
                raise ValueError(f"token_mask has {token_mask.numel()} entries for {probs.shape[0]} routed tokens")
            weight = token_mask.reshape(-1).to(device=probs.device, dtype=torch.float32)  # (tokens,)
        num_tokens = weight.sum().clamp(min=1.0)
        top1 = F.one_hot(probs.argmax(dim=-1), num_experts).float()  # (tokens, E)
        fraction = (top1 * weight.unsqueeze(-1)).sum(dim=0) / num_tokens  # F, (E,)
        mean_prob = (probs * weight.unsqueeze(-1)).sum(dim=0) / num_tokens  # G, (E,)
        per_layer.append(num_experts * torch.sum(fraction * mean_prob))
    return torch.stack(per_layer).mean()


@contextmanager
def record_router_outputs(model: nn.Module) -> Iterator[dict[int, list[RouterOutput]]]:
    """Record every :class:`SkyMoERouter` output of ``model`` while the context is open.

    Forward hooks are registered on entry and removed on exit (also on error). Each forward
    pass appends one :class:`RouterOutput` per MoE layer (tensors keep their autograd graph).

    Args:
        model: Any module containing SkyMoE routers.

    Yields:
        ``{layer_idx: [RouterOutput, ...]}``, filled as forwards run.
    """
    records: dict[int, list[RouterOutput]] = {}
    handles = []

    def _hook(module: SkyMoERouter, _args: tuple, output: RouterOutput) -> None:
        records.setdefault(module.layer_idx, []).append(output)

    for module in model.modules():
        if isinstance(module, SkyMoERouter):
            handles.append(module.register_forward_hook(_hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
