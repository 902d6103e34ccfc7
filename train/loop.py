"""One explicit training loop with exact, atomic, resumable checkpoints.

The loop (:func:`train`) runs on accelerate, so the same code runs single-process
on CPU (tests), on one GPU, and under ``accelerate launch`` with DeepSpeed ZeRO-2
or FSDP (``train/configs/``). Everything that decides a run's numbers is a pure
function of the step: the learning rate (:func:`cosine_lr`) and the data order
(:func:`epoch_batches`); the rest of the state (trainable weights, AdamW moments,
RNG states) is saved in safetensors + JSON (no pickle), so a resumed run
reproduces the uninterrupted run's per-step losses.

Checkpoint folder ``output_dir/checkpoints/step-NNNNNNN/``::

    trainable.safetensors     trainable parameters by name (the frozen rest is rebuilt from the config)
    optimizer[-rankR].safetensors / .json   AdamW state: tensors + structure
    rng-rankR.safetensors / .json           torch / CUDA / numpy / python RNG states
    trainer_state.json        step, epoch, batch geometry, config, loss history

It is written to ``.tmp-step-NNNNNNN-*`` and renamed when complete; a failed
write (disk full included) removes the partial folder and raises
:class:`CheckpointWriteError`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from train.box_attention import BoxAttentionLoss, plus_box_attention, supervising
from train.config import LoopConfig, OptimConfig

__all__ = [
    "bf16_autocast",
    "has_bf16",
    "seconds_per_call_after_prefetch",
    "CheckpointError",
    "CheckpointWriteError",
    "CheckpointMismatchError",
    "StepLog",
    "TrainResult",
    "cosine_lr",
    "epoch_batches",
    "accumulation_steps",
    "atomic_directory",
    "find_latest_checkpoint",
    "train",
]

logger = logging.getLogger(__name__)

_STEP_PREFIX = "step-"
_STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A training checkpoint cannot be used to resume."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint belongs to another model or another batch geometry."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. disk full); no partial folder was left."""


@dataclass(frozen=True)
class StepLog:
    """Losses of one optimizer step, averaged over its micro-batches and processes.

    Attributes:
        step: optimizer steps done (1-based).
        epoch: epoch of the step (0-based).
        lr: learning rate used by the step.
        lm_loss: cross-entropy on answer tokens.
        aux_loss: router load-balancing loss (0 for a dense model), before alpha.
        loss: the optimised total ``lm_loss + alpha * aux_loss + coef * box_attention_loss``.
        box_attention_loss: :mod:`train.box_attention` loss before its coef (0 when not used).
    """

    step: int
    epoch: int
    lr: float
    lm_loss: float
    aux_loss: float
    loss: float
    box_attention_loss: float = 0.0


@dataclass
class TrainResult:
    """What :func:`train` did: the per-step log (resumed steps included) and where it stopped."""

    history: list[StepLog] = field(default_factory=list)
    last_step: int = 0
    total_steps: int = 0
    checkpoint: Path | None = None
    accelerator: Any = None

    @property
    def finished(self) -> bool:
        """True when the planned number of steps ran (not stopped early)."""
        return self.last_step >= self.total_steps


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    ``lr = peak * (step + 1) / warmup`` for ``step < warmup``; afterwards
    ``min + (peak - min) * 0.5 * (1 + cos(pi * p))`` with
    ``p = (step - warmup) / max(1, total - warmup)`` clipped to ``[0, 1]``.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def accumulation_steps(global_batch: int, per_device_batch: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that ``per_device * accum * world == global``.

    Raises:
        ValueError: ``global_batch`` is not a multiple of ``per_device_batch * world_size``.
    """
    per_step = per_device_batch * world_size
    if per_device_batch < 1 or global_batch < per_step or global_batch % per_step:
        raise ValueError(
            f"loop.global_batch_size {global_batch} must be a positive multiple of "
            f"loop.per_device_batch_size {per_device_batch} x {world_size} process(es) = {per_step}"
        )
    return global_batch // per_step


def epoch_batches(num_samples: int, epoch: int, seed: int, micro_batch: int, accum: int,
                  world_size: int = 1, rank: int = 0) -> list[list[list[int]]]:
    """Sample indices of every optimizer step of an epoch, for one process.

    The epoch's order is a permutation drawn from ``seed + epoch``; the last global
    batch is filled by wrapping around to the permutation's start, so every sample
    is seen each epoch and every step has a full global batch. Global batch ``g``
    holds ``perm[g * G : (g + 1) * G]`` with ``G = micro_batch * accum * world_size``;
    micro-batch ``j`` of process ``rank`` is its slice ``(j * world_size + rank) * micro_batch``.

    Returns:
        ``steps[step_in_epoch][micro][i]`` sample indices.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(num_samples, generator=generator).tolist()
    global_batch = micro_batch * accum * world_size
    n_steps = math.ceil(num_samples / global_batch)
    padded = (perm * math.ceil(n_steps * global_batch / num_samples))[: n_steps * global_batch]
    steps = []
    for g in range(n_steps):
        chunk = padded[g * global_batch : (g + 1) * global_batch]
        steps.append([chunk[(j * world_size + rank) * micro_batch : (j * world_size + rank + 1) * micro_batch]
                      for j in range(accum)])
    return steps


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it to ``final`` on success.

    On any exception the temporary folder is removed and ``final`` is untouched;
    an ``OSError`` (disk full, permission) becomes :class:`CheckpointWriteError`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, SafetensorError) as exc:  # save_pretrained writes through safetensors
        shutil.rmtree(tmp, ignore_errors=True)
        code = getattr(exc, "errno", None) or (errno.ENOSPC if "No space left" in str(exc) else errno.EIO)
        raise CheckpointWriteError(code, _write_error_message(final, exc, code)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_error_message(final: Path, exc: Exception, code: int | None = None) -> str:
    free_mb = shutil.disk_usage(final.parent).free / 2**20
    code = getattr(exc, "errno", None) if code is None else code
    reason = "no space left on device" if code == errno.ENOSPC else (getattr(exc, "strerror", None) or str(exc))
    return (f"could not write {final} ({reason}; {free_mb:.0f} MB free on its disk). Nothing partial was kept "
            "and earlier checkpoints are intact; free space or point loop.output_dir elsewhere, then rerun "
            "(the run resumes from the newest checkpoint).")


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (None if none)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.glob(f"{_STEP_PREFIX}*") if (p / _STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name[len(_STEP_PREFIX):]), default=None)


# ----------------------------------------------------------------------------- nested state <-> safetensors


def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of a nested state; tensors go to ``tensors`` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(obj.copy())
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key} in a safetensors checkpoint")


def _unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, list):
        return [_unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            return tensors[skeleton["__ndarray__"]].numpy()
        if "__tuple__" in skeleton:
            return tuple(_unflatten(v, tensors) for v in skeleton["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in skeleton["__dict__"]}
    return skeleton


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file``, its I/O failures (disk full, ...) raised as ``OSError``."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:  # safetensors reports e.g. "I/O error: No space left on device (os error 28)"
        code = re.search(r"os error (\d+)", str(exc))
        raise OSError(int(code.group(1)) if code else errno.EIO, str(exc), str(path)) from exc


def _save_nested(obj: Any, folder: Path, stem: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(obj, "s", tensors)
    _save_tensors(tensors, folder / f"{stem}.safetensors")
    (folder / f"{stem}.json").write_text(json.dumps(skeleton))


def _load_nested(folder: Path, stem: str) -> Any:
    try:
        tensors = load_file(str(folder / f"{stem}.safetensors"))
        skeleton = json.loads((folder / f"{stem}.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {folder}: cannot read {stem}: {exc}") from exc
    return _unflatten(skeleton, tensors)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class _Geometry:
    """What must match between a checkpoint and the run resuming from it."""

    num_samples: int
    global_batch: int
    micro_batch: int
    accum: int
    world_size: int
    seed: int
    total_steps: int


def _trainable_state(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    state = accelerator.get_state_dict(model)  # collective under FSDP / ZeRO-3
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if k in names}


def _optimizer_stem(accelerator) -> str:
    sharded = accelerator.distributed_type.value in ("DEEPSPEED", "FSDP")
    return f"optimizer-rank{accelerator.process_index}" if sharded else "optimizer"


def _save_checkpoint(accelerator, model, optimizer, output_dir: Path, step: int, epoch: int,
                     geometry: _Geometry, history: list[StepLog], run_config: dict, keep: int) -> Path:
    """Write the checkpoint of ``step`` to a temporary folder, then rename it (see the module docstring).

    Every process writes its RNG state (and, under DeepSpeed/FSDP, its optimizer shard) into
    the shared temporary folder; the main process writes the rest and renames.
    """
    final = output_dir / "checkpoints" / f"{_STEP_PREFIX}{step:07d}"
    tmp = final.parent / f".tmp-{final.name}"
    main = accelerator.is_main_process
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        weights = _trainable_state(accelerator, model)
        stem = _optimizer_stem(accelerator)
        if main or stem != "optimizer":
            _save_nested(optimizer.state_dict(), tmp, stem)
        _save_nested(_rng_state(), tmp, f"rng-rank{accelerator.process_index}")
        accelerator.wait_for_everyone()
        if main:
            _save_tensors(weights, tmp / "trainable.safetensors")
            state = {"step": step, "epoch": epoch, "geometry": asdict(geometry), "config": run_config,
                     "param_shapes": {k: list(v.shape) for k, v in weights.items()},
                     "history": [asdict(h) for h in history]}
            (tmp / _STATE_FILE).write_text(json.dumps(state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(exc.errno, _write_error_message(final, exc)) from exc
    accelerator.wait_for_everyone()
    if main:
        _prune_checkpoints(output_dir, keep)
        logger.info("checkpoint written: %s", final)
    return final


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted((p for p in (output_dir / "checkpoints").glob(f"{_STEP_PREFIX}*") if (p / _STATE_FILE).is_file()),
                  key=lambda p: int(p.name[len(_STEP_PREFIX):]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, accelerator, model, optimizer, geometry: _Geometry) -> dict:
    """Restore weights, optimizer and RNG from ``folder``; return its trainer state."""
    try:
        state = json.loads((folder / _STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} is not a complete training checkpoint ({_STATE_FILE}: {exc})") from exc
    _check_geometry(folder, state.get("geometry", {}), geometry)
    unwrapped = accelerator.unwrap_model(model)
    expected = {n: list(p.shape) for n, p in unwrapped.named_parameters() if p.requires_grad}
    _check_params(folder, state.get("param_shapes", {}), expected)
    weights = load_file(str(folder / "trainable.safetensors"))
    with torch.no_grad():
        params = dict(unwrapped.named_parameters())
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(_load_nested(folder, _optimizer_stem(accelerator)))
    _set_rng_state(_load_nested(folder, f"rng-rank{accelerator.process_index}"))
    return state


def _check_geometry(folder: Path, saved: dict, current: _Geometry) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in asdict(current).items() if saved.get(k) != v]
    if diffs:
        raise CheckpointMismatchError(
            f"cannot resume from {folder}: the run differs ({'; '.join(diffs)}); the data order and schedule "
            "would not continue. Use the original settings or loop.resume=none to start over."
        )


def _check_params(folder: Path, saved: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{what} ({len(keys)}): {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes)) if keys
        )
        raise CheckpointMismatchError(
            f"checkpoint {folder} holds the trainable parameters of another model ({detail}). "
            "Point loop.resume at a checkpoint of this model and stage, or set loop.resume=none."
        )


# ----------------------------------------------------------------------------- the loop


@functools.cache  # asked on every step of Stage 0 and the step timing; the CPU does not change
def _cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX). There oneDNN runs
    bf16 matmuls several times faster than fp32; other CPUs emulate bf16, slower than fp32.
    torch only has private checks for it; a torch without them counts as no."""
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def has_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast pays on ``device``: CUDA with bf16, or a CPU with native bf16 dot
    products (:func:`_cpu_has_native_bf16`; ``bench/bench_demo_training.py --precision`` measures
    the gain). Elsewhere the loop trains in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_native_bf16()


def bf16_autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on ``device`` where the loop trains in bf16 (:func:`has_bf16`) and ``enabled``,
    a no-op elsewhere: for steps run outside the loop (Stage 0, step timing) at the loop's precision."""
    return torch.autocast(device.type, torch.bfloat16, enabled=enabled and has_bf16(device))


def seconds_per_call_after_prefetch(step: Callable[[], object], loader_workers: int) -> tuple[float, int]:
    """Time ``step`` (one batch from a DataLoader with ``loader_workers`` processes, and its work)
    once the batches those workers prefetched (two each) are used up, so a step bound by data
    loading is timed as such: ``2 * workers + 1`` warm calls, then ``max(3, workers)`` timed ones.

    Returns:
        ``(seconds per timed call, calls made in all)``.
    """
    warm, timed = 2 * loader_workers + 1, max(3, loader_workers)
    for _ in range(warm):
        step()
    start = time.perf_counter()
    for _ in range(timed):
        step()
    return (time.perf_counter() - start) / timed, warm + timed


def _make_accelerator(loop_cfg: LoopConfig) -> tuple[Any, int, Callable[[], contextlib.AbstractContextManager]]:
    """The accelerator, the gradient accumulation steps, and the context the loop runs each forward in.

    On CUDA, accelerate's ``mixed_precision="bf16"`` autocasts the forward (and sets DeepSpeed's
    bf16). On a CPU the loop autocasts itself and leaves accelerate at ``"no"``: accelerate keeps the
    precision in a process-wide state that cannot change once set, and one process trains several
    times (the demo's stages, the tests), some in fp32.
    """
    from accelerate import Accelerator, PartialState

    cpu = not torch.cuda.is_available()  # CPU-only: torchrun workers join a gloo group (tests, debugging)
    world = PartialState(cpu=cpu).num_processes
    accum = accumulation_steps(loop_cfg.global_batch_size, loop_cfg.per_device_batch_size, world)
    bf16 = loop_cfg.bf16 and has_bf16(torch.device("cpu" if cpu else "cuda"))
    if loop_cfg.bf16 and not bf16:
        logger.info("bf16 requested but this hardware has no native bf16 (CUDA with bf16, or a CPU with "
                    "AVX512-BF16 or AMX); training in fp32")
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=accum,
                              mixed_precision="bf16" if bf16 and not cpu else "no")
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # the loop batches its own data, so DeepSpeed cannot infer the micro-batch
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = loop_cfg.per_device_batch_size
    return accelerator, accum, functools.partial(torch.autocast, "cpu", torch.bfloat16, enabled=bf16 and cpu)


def _make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, 1-D params)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter; check the stage's trainable settings")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def _resume_folder(loop_cfg: LoopConfig) -> Path | None:
    if loop_cfg.resume == "none":
        return None
    if loop_cfg.resume == "auto":
        return find_latest_checkpoint(loop_cfg.output_dir)
    folder = Path(loop_cfg.resume)
    if not (folder / _STATE_FILE).is_file():
        raise CheckpointError(f"loop.resume={loop_cfg.resume!r}: no {_STATE_FILE} there; give a "
                              "checkpoints/step-NNNNNNN folder, 'auto' or 'none'")
    return folder


def _micro_step(accelerator, model, batch: dict[str, torch.Tensor], box_attention: BoxAttentionLoss | None,
                precision: Callable[[], contextlib.AbstractContextManager]) -> tuple[float, float, float, float]:
    """Forward (in the ``precision`` context) + backward of one micro-batch; returns
    ``(lm, aux, total, box attention)`` losses."""
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    with precision():
        out = model(**batch)
    if out.loss is None:
        raise ValueError("the model returned no loss: the batch needs labels")
    loss, box = plus_box_attention(out.loss, batch, box_attention)
    accelerator.backward(loss)
    lm = out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss
    aux = getattr(out, "aux_loss", None)
    return (float(lm.detach()), float(aux.detach()) if aux is not None else 0.0, float(loss.detach()),
            float(box.detach()) if box is not None else 0.0)


def train(model: torch.nn.Module, dataset: Sequence, collate_fn: Callable, loop_cfg: LoopConfig,
          optim_cfg: OptimConfig, run_config: dict | None = None, stop_after: int | None = None,
          box_attention: BoxAttentionLoss | None = None) -> TrainResult:
    """Train ``model`` on ``dataset``; checkpoint and resume as configured.

    The model's forward takes the collated batch and returns ``loss`` (total),
    ``lm_loss`` and ``aux_loss`` (SkyMoE's output); only parameters with
    ``requires_grad`` train. Fresh runs seed python/numpy/torch with ``loop_cfg.seed``.

    Args:
        model: the model, trainable parameters already chosen.
        dataset: indexable samples; ``collate_fn`` batches a list of them.
        collate_fn: e.g. :class:`train.dataset.PaddingCollator`.
        loop_cfg: batch, epochs, precision, checkpoints, resume.
        optim_cfg: AdamW and schedule settings.
        run_config: the whole stage config, stored in checkpoints.
        stop_after: stop after this optimizer step as if interrupted (tests, time-boxed jobs);
            the schedule still spans the whole run.
        box_attention: an auxiliary :class:`train.box_attention.BoxAttentionLoss` of the same
            model, added with its coef.

    Returns:
        :class:`TrainResult` with the per-step log.

    Raises:
        ValueError: batch sizes that do not divide, no trainable parameter.
        CheckpointError / CheckpointMismatchError: a resume checkpoint that does not fit.
        CheckpointWriteError: a checkpoint could not be written (disk full, ...).
    """
    accelerator, accum, precision = _make_accelerator(loop_cfg)
    steps_per_epoch = math.ceil(len(dataset) / loop_cfg.global_batch_size)
    total = steps_per_epoch * loop_cfg.epochs
    total = min(total, loop_cfg.max_steps) if loop_cfg.max_steps else total
    geometry = _Geometry(len(dataset), loop_cfg.global_batch_size, loop_cfg.per_device_batch_size, accum,
                         accelerator.num_processes, loop_cfg.seed, total)
    optimizer = _make_optimizer(model, optim_cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    result = TrainResult(total_steps=total, accelerator=accelerator)
    resume = _resume_folder(loop_cfg)
    if resume is not None:
        state = _load_checkpoint(resume, accelerator, model, optimizer, geometry)
        result.history = [StepLog(**h) for h in state["history"]]
        result.last_step = state["step"]
        if accelerator.is_main_process:  # drop log lines of steps after the checkpoint (they are redone)
            (Path(loop_cfg.output_dir) / "log.jsonl").write_text("".join(json.dumps(asdict(h)) + "\n"
                                                                        for h in result.history))
        logger.info("resumed from %s at step %d", resume, state["step"])
    else:
        _seed_everything(loop_cfg.seed)
    with supervising(box_attention):
        _run_steps(accelerator, model, optimizer, dataset, collate_fn, loop_cfg, optim_cfg, geometry,
                   result, run_config or {}, stop_after, box_attention, precision)
    return result


def _run_steps(accelerator, model, optimizer, dataset, collate_fn, loop_cfg: LoopConfig, optim_cfg: OptimConfig,
               geometry: _Geometry, result: TrainResult, run_config: dict, stop_after: int | None,
               box_attention: BoxAttentionLoss | None,
               precision: Callable[[], contextlib.AbstractContextManager]) -> None:
    """The loop proper: steps ``result.last_step .. total`` with logging and checkpoints, each
    forward in the ``precision`` context (:func:`_make_accelerator`)."""
    output_dir = Path(loop_cfg.output_dir)
    warmup = math.ceil(optim_cfg.warmup_ratio * geometry.total_steps)
    steps_per_epoch = math.ceil(geometry.num_samples / geometry.global_batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    log_file = output_dir / "log.jsonl"
    output_dir.mkdir(parents=True, exist_ok=True)
    step = result.last_step
    while step < geometry.total_steps and (stop_after is None or step < stop_after):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        plan = epoch_batches(geometry.num_samples, epoch, geometry.seed, geometry.micro_batch, geometry.accum,
                             geometry.world_size, accelerator.process_index)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[mb for s in plan[in_epoch:] for mb in s],
                                             collate_fn=collate_fn, num_workers=loop_cfg.num_workers,
                                             # own generator: creating a loader must not draw from the
                                             # global RNG, or a resumed run's dropout would diverge
                                             generator=torch.Generator().manual_seed(geometry.seed + epoch))
        batches = iter(loader)
        for _ in range(in_epoch, steps_per_epoch):
            if step >= geometry.total_steps or (stop_after is not None and step >= stop_after):
                break
            lr = cosine_lr(step, geometry.total_steps, warmup, optim_cfg.lr, optim_cfg.lr * optim_cfg.min_lr_ratio)
            losses = _optimizer_step(accelerator, model, optimizer, trainable, batches, geometry.accum, lr,
                                     optim_cfg.max_grad_norm, box_attention, precision)
            step += 1
            record = StepLog(step, epoch, lr, *losses)
            result.history.append(record)
            result.last_step = step
            if accelerator.is_main_process:
                logger.info("step %d/%d epoch %d lr %.3g loss %.4f (lm %.4f aux %.4f box attention %.4f)", step,
                            geometry.total_steps, epoch, lr, record.loss, record.lm_loss, record.aux_loss,
                            record.box_attention_loss)
                with log_file.open("a") as fh:
                    fh.write(json.dumps(asdict(record)) + "\n")
            if loop_cfg.save_every_steps and step % loop_cfg.save_every_steps == 0:
                result.checkpoint = _save_checkpoint(accelerator, model, optimizer, output_dir, step, epoch,
                                                     geometry, result.history, run_config, loop_cfg.keep_checkpoints)


def _optimizer_step(accelerator, model, optimizer, trainable, batches, accum: int, lr: float, max_grad_norm: float,
                    box_attention: BoxAttentionLoss | None,
                    precision: Callable[[], contextlib.AbstractContextManager]) -> tuple[float, float, float, float]:
    """``accum`` micro-batches then one AdamW step at ``lr``; mean losses over micro-batches and processes."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = torch.zeros(4, dtype=torch.float64)
    for _ in range(accum):
        with accelerator.accumulate(model):
            sums += torch.tensor(_micro_step(accelerator, model, next(batches), box_attention, precision), dtype=torch.float64)
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    mean = accelerator.reduce((sums / accum).to(accelerator.device), reduction="mean").cpu()
    return float(mean[0]), float(mean[1]), float(mean[2]), float(mean[3])
