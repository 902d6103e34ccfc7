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
    "FusedExperts",
    "MOE_IMPLEMENTATIONS",
    "MASKED_MAX_TOKENS",
    "grouped_mm_kernel_available",
    "moe_blocks",
    "fuse_experts",
    "release_fused_experts",
    "set_moe_implementation",
    "moe_implementation",
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


#: Attribute names of a Llama MLP's projections, in the order of ``FusedExperts.pointers``.
_EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

#: MoE block implementations (:attr:`SkyMoESparseBlock.implementation`).
MOE_IMPLEMENTATIONS = ("auto", "loop", "masked", "grouped", "grouped_mm")

#: ``"auto"`` uses the dense-masked formulation on CUDA up to this many tokens (decoding) when
#: the experts cannot be stacked (quantized or LoRA-wrapped experts).
MASKED_MAX_TOKENS = 64


def grouped_mm_kernel_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where ``torch._grouped_mm`` runs as one fused kernel with device-side offsets.

    That is CUDA with compute capability >= 9.0 (Hopper) and bfloat16. Elsewhere PyTorch runs
    it as a slower fallback (measured on this project's CPU: 2x slower than a loop of matmuls
    for a 3000-token prefill), so ``"auto"`` takes the ``"grouped"`` loop there.
    """
    if not hasattr(torch, "_grouped_mm") or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


@dataclass
class FusedExperts:
    """Stacked expert weights that the experts' own ``nn.Linear`` weights are views of.

    Attributes:
        gate_up: ``(E, 2 * intermediate, hidden)``: rows ``[:I]`` are ``gate_proj``, ``[I:]`` ``up_proj``.
        down: ``(E, hidden, intermediate)``: ``down_proj``.
        pointers: The ``data_ptr()`` of every expert weight at fusion time (``3 * E``), to detect
            weights that were later replaced or moved (``.to()``, ``load_state_dict(assign=True)``).
        kernel: Whether ``torch._grouped_mm`` runs as a fused kernel for these weights
            (:func:`grouped_mm_kernel_available`, decided at fusion, outside any compiled region).
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    pointers: tuple[int, ...]
    kernel: bool


class SkyMoESparseBlock(nn.Module):
    """Top-k mixture of Llama FFN experts replacing a decoder layer's MLP (paper eq. 4).

    Experts are an ``nn.ModuleList`` of :class:`~transformers.models.llama.modeling_llama.LlamaMLP`
    (three ``nn.Linear`` each), so bitsandbytes and peft LoRA apply to them as to any Linear.
    No token is dropped, no noise is added. Five implementations of the same function
    (:attr:`implementation`, set with :func:`set_moe_implementation`):

    * ``"loop"``: tokens grouped per expert, each selected expert runs once on its own tokens
      (one host synchronisation per layer for the group sizes); works for any expert Linear
      and for training. The reference ("plain") path.
    * ``"masked"``: every expert runs on every token and a dense ``(tokens, E)`` weight
      matrix (zero for unselected experts) mixes them: no host synchronisation, E/k times the
      FLOPs; works for quantized / LoRA experts. Meant for a few tokens (decoding).
    * ``"grouped_mm"``: tokens sorted by expert (one gather), one ``torch._grouped_mm`` per
      projection over the stacked weights (gate and up fused) with device-side group offsets:
      no host synchronisation, only the selected experts' weights are read.
    * ``"grouped"``: the same sorted tokens and stacked weights, one matmul per non-empty
      expert group (group sizes read on the host once per layer): the prefill path where the
      ``_grouped_mm`` kernel is missing (CPU, pre-Hopper GPUs).
    * ``"auto"`` (default), without autograd: ``grouped_mm`` when the experts are fused and the
      kernel exists (Hopper, bf16); else ``masked`` on CUDA for at most :data:`MASKED_MAX_TOKENS`
      tokens (decoding of quantized / LoRA experts, or pre-Hopper GPUs); else ``grouped`` when
      fused, ``loop`` otherwise. With autograd: ``loop``.

    The grouped paths need :meth:`fuse_experts` (plain bias-free ``nn.Linear`` experts) and no autograd.
    """

    def __init__(self, config: SkyMoEConfig, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.top_k = config.num_experts_per_tok
        self.router = SkyMoERouter(config, layer_idx)
        self.experts = nn.ModuleList([LlamaMLP(config.text_config) for _ in range(config.num_experts)])
        self.implementation = "auto"
        self._fused: FusedExperts | None = None

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

    def resolved_implementation(self, num_tokens: int, device: torch.device, dtype: torch.dtype) -> str:
        """The implementation :meth:`forward` uses for ``num_tokens`` tokens of ``dtype`` on ``device``
        (resolves ``"auto"``)."""
        if self.implementation != "auto":
            return self.implementation
        if torch.is_grad_enabled():
            return "loop"
        fused = self.is_fused()
        if fused and self._fused.kernel and dtype == self._fused.gate_up.dtype:
            return "grouped_mm"
        if device.type == "cuda" and num_tokens <= MASKED_MAX_TOKENS:
            return "masked"  # no host sync where the grouped_mm kernel is missing or experts are not plain
        return "grouped" if fused else "loop"

    def _mix_experts(self, flat: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """Dispatch to the implementation (see the class docstring); ``(tokens, D)`` -> ``(tokens, D)``."""
        implementation = self.resolved_implementation(flat.shape[0], flat.device, flat.dtype)
        if implementation in ("grouped", "grouped_mm"):
            return self._mix_grouped(flat, routing, kernel=implementation == "grouped_mm")
        if implementation == "masked":
            return self._mix_masked(flat, routing)
        return self._mix_loop(flat, routing)

    def _mix_loop(self, flat: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
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

    def _mix_masked(self, flat: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """Every expert on every token, mixed by a dense ``(tokens, E)`` weight matrix (no host sync).

        Experts are summed in ascending id order into a zero tensor of the input dtype, like
        :meth:`_mix_loop`, and unselected experts add an exact zero.
        """
        dense = torch.zeros(flat.shape[0], len(self.experts), dtype=routing.top_k_weights.dtype, device=flat.device)
        dense.scatter_(1, routing.top_k_index, routing.top_k_weights)  # (tokens, E) float32
        output = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            output += (expert(flat) * dense[:, index : index + 1]).to(flat.dtype)
        return output

    def _mix_grouped(self, flat: torch.Tensor, routing: RouterOutput, kernel: bool) -> torch.Tensor:
        """Tokens sorted by expert, one matmul per projection and expert group over the stacked weights.

        Args:
            flat: ``(tokens, hidden_size)`` token states.
            routing: The router's decision for these tokens.
            kernel: True: one ``torch._grouped_mm`` per projection with device-side group offsets
                (no host synchronisation); False: a loop over the non-empty groups (sizes read on the host).

        Returns:
            ``(tokens, hidden_size)`` the weighted sum of the k expert outputs per token.

        Raises:
            RuntimeError: If the experts are not fused (call :meth:`fuse_experts` first).
        """
        fused = self._fused
        if fused is None or not self.is_fused():
            raise RuntimeError(
                f"MoE layer {self.layer_idx}: the grouped implementations need fused experts; call "
                "skymoe.moe.fuse_experts(model) after loading/moving the model, or use 'loop'"
            )
        num_experts, intermediate = fused.gate_up.shape[0], fused.down.shape[2]
        expert_of_slot = routing.top_k_index.reshape(-1)  # (tokens * k,)
        order = torch.argsort(expert_of_slot, stable=True)  # slots grouped by expert
        token_of_slot = order // self.top_k  # (tokens * k,)
        weight_of_slot = routing.top_k_weights.reshape(-1)[order]  # (tokens * k,)
        counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, expert_of_slot, torch.ones_like(expert_of_slot, dtype=torch.int32))  # (E,)
        x = flat.index_select(0, token_of_slot)  # (tokens * k, D) sorted by expert
        act_fn = self.experts[0].act_fn
        if kernel:
            offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,) end row of each expert's group
            gate_up = torch._grouped_mm(x, fused.gate_up.transpose(-2, -1), offs=offsets)  # (tokens * k, 2I)
            hidden = act_fn(gate_up[:, :intermediate]) * gate_up[:, intermediate:]  # (tokens * k, I)
            expert_out = torch._grouped_mm(hidden, fused.down.transpose(-2, -1), offs=offsets)  # (tokens * k, D)
        else:
            outs = []
            for expert, rows in enumerate(x.split(counts.tolist())):
                if rows.shape[0]:
                    gate_up = F.linear(rows, fused.gate_up[expert])  # (n_e, 2I)
                    hidden = act_fn(gate_up[:, :intermediate]) * gate_up[:, intermediate:]  # (n_e, I)
                    outs.append(F.linear(hidden, fused.down[expert]))  # (n_e, D)
            expert_out = torch.cat(outs)  # (tokens * k, D)
        output = torch.zeros_like(flat)
        output.index_add_(0, token_of_slot, (expert_out * weight_of_slot.unsqueeze(-1)).to(flat.dtype))
        return output

    def _apply(self, fn, recurse: bool = True):
        """Drop the stacks before ``.to()`` / ``.half()`` / ... convert the weights (they stop being views)."""
        self._fused = None
        return super()._apply(fn, recurse)

    def _expert_linears(self) -> list[nn.Module]:
        """``[gate_0, up_0, down_0, gate_1, ...]``, the 3 * E projection modules."""
        # _modules lookups, not attribute access: is_fused calls this on every forward of the "auto" path
        return [expert._modules[name] for expert in self.experts._modules.values() for name in _EXPERT_PROJECTIONS]

    def can_fuse(self) -> bool:
        """True when every expert projection is a plain, bias-free ``nn.Linear`` on one device and dtype.

        Quantized (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``), LoRA-wrapped, offloaded
        (accelerate hooks) or meta experts cannot be stacked: they keep the ``loop`` / ``masked`` paths.
        """
        linears = self._expert_linears()
        if not all(type(lin) is nn.Linear and lin.bias is None and not hasattr(lin, "_hf_hook") for lin in linears):
            return False
        weights = [lin.weight for lin in linears]
        first = weights[0]
        return first.device.type != "meta" and all(w.device == first.device and w.dtype == first.dtype for w in weights)

    def is_fused(self) -> bool:
        """True while the experts are still plain ``nn.Linear`` whose weights are the views made by :meth:`fuse_experts`."""
        if self._fused is None:
            return False
        if torch.compiler.is_compiling():
            return True  # checked by fuse_experts before compiling; data_ptr() cannot be traced
        # a Linear replaced or wrapped later (peft LoRA, quantization) keeps its weight but is no longer plain
        pointers = tuple(lin._parameters["weight"].data_ptr() if type(lin) is nn.Linear else -1
                         for lin in self._expert_linears())
        return pointers == self._fused.pointers

    @torch.no_grad()
    def fuse_experts(self) -> bool:
        """Stack the expert weights and make each expert ``nn.Linear`` weight a view of the stack.

        Memory-neutral after the call (the old per-expert tensors are released); values, module
        types, ``Parameter`` objects and ``state_dict`` keys are unchanged. Idempotent. Must be repeated after the
        weights are replaced or moved (``.to()``): :meth:`is_fused` then reads False and
        ``"auto"`` falls back to the other paths until it is.

        Returns:
            True when the experts are fused, False when they cannot be (see :meth:`can_fuse`).
        """
        if self.is_fused():
            return True
        self._fused = None
        if not self.can_fuse():
            return False
        intermediate = self.experts[0].gate_proj.out_features
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])  # (E, 2I, D)
        down = torch.stack([e.down_proj.weight for e in self.experts])  # (E, D, I)
        for index, expert in enumerate(self.experts):
            for lin, view in ((expert.gate_proj, gate_up[index, :intermediate]),
                              (expert.up_proj, gate_up[index, intermediate:]), (expert.down_proj, down[index])):
                lin.weight.data = view  # same Parameter object: optimizers and hooks keep their references
        pointers = tuple(lin.weight.data_ptr() for lin in self._expert_linears())
        kernel = grouped_mm_kernel_available(gate_up.device, gate_up.dtype)
        self._fused = FusedExperts(gate_up=gate_up, down=down, pointers=pointers, kernel=kernel)
        return True


def moe_blocks(model: nn.Module) -> list[SkyMoESparseBlock]:
    """Every SkyMoE block of ``model``, in module order (one walk over the modules)."""
    return [block for block in model.modules() if isinstance(block, SkyMoESparseBlock)]


def release_fused_experts(model: nn.Module) -> None:
    """Drop every MoE block's stacked tensors (e.g. before quantizing the experts in place).

    The expert weights stay views of the stacks' storage until they are replaced; once every
    expert Linear of a block is replaced, its stack's memory is freed.
    """
    for block in moe_blocks(model):
        block._fused = None


def fuse_experts(model: nn.Module | Sequence[SkyMoESparseBlock]) -> int:
    """:meth:`SkyMoESparseBlock.fuse_experts` on every MoE block of ``model``.

    Args:
        model: Any module containing SkyMoE blocks, or the blocks themselves (:func:`moe_blocks`).

    Returns:
        The number of blocks that are fused (blocks with quantized / LoRA experts are skipped).
    """
    blocks = moe_blocks(model) if isinstance(model, nn.Module) else model
    return sum(block.fuse_experts() for block in blocks)


def set_moe_implementation(model: nn.Module, implementation: str) -> None:
    """Set :attr:`SkyMoESparseBlock.implementation` on every MoE block of ``model``.

    Args:
        model: Any module containing SkyMoE blocks.
        implementation: One of :data:`MOE_IMPLEMENTATIONS`.

    Raises:
        ValueError: Unknown implementation.
    """
    _set_implementation(moe_blocks(model), implementation)


def _set_implementation(blocks: list[SkyMoESparseBlock], implementation: str) -> None:
    """Validate ``implementation`` and set it on ``blocks``."""
    if implementation not in MOE_IMPLEMENTATIONS:
        raise ValueError(f"unknown MoE implementation {implementation!r}; choose one of {MOE_IMPLEMENTATIONS}")
    for block in blocks:
        block.implementation = implementation


@contextmanager
def moe_implementation(model: nn.Module | Sequence[SkyMoESparseBlock], implementation: str) -> Iterator[None]:
    """Use ``implementation`` in every MoE block of ``model`` (a module, or its :func:`moe_blocks`)
    inside the context, then restore each block's own.

    Not thread-safe: concurrent calls on one model with different implementations interfere
    (results stay correct, only the path taken changes).
    """
    blocks = moe_blocks(model) if isinstance(model, nn.Module) else list(model)
    previous = [b.implementation for b in blocks]
    _set_implementation(blocks, implementation)
    try:
        yield
    finally:
        for block, impl in zip(blocks, previous, strict=True):
            block.implementation = impl


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
