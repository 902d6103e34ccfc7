"""Typed training configs loaded from YAML.

Every field of a config is a dataclass field with a type; :func:`load_config`
checks the YAML against those types and names the key and the file of the
first problem (missing field, unknown field, wrong type, value not allowed).
Relative paths in a config are resolved against the current working directory
(run the commands from the repository root).
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "LoopConfig",
    "LoraSettings",
    "MoESettings",
    "Stage1Config",
    "Stage2Config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file is missing a field, has an unknown one or a value of the wrong type."""


@dataclass
class DataConfig:
    """Where the instruction data lives and how it is tokenised.

    Attributes:
        train_jsonl: instruction JSONL (one sample per line, see DESIGN.md section 6).
        max_length: samples longer than this many tokens (image tokens included) are
            truncated from the right; their answer may be lost, which is logged.
    """

    train_jsonl: str
    max_length: int = 2048


@dataclass
class OptimConfig:
    """AdamW and the cosine schedule with linear warmup (paper: lr 2e-5, cosine).

    Attributes:
        lr: peak learning rate reached after warmup.
        min_lr_ratio: the schedule ends at ``lr * min_lr_ratio``.
        warmup_ratio: share of all optimizer steps spent in linear warmup.
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW ``(beta1, beta2)``.
        eps: AdamW epsilon.
        max_grad_norm: gradient clipping norm; 0 disables clipping.
    """

    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class LoopConfig:
    """The explicit training loop: batch, epochs, precision, checkpoints.

    Attributes:
        output_dir: run folder; checkpoints go to ``output_dir/checkpoints/step-NNNNNNN``.
        epochs: passes over the data (paper: 5).
        global_batch_size: samples per optimizer step over all processes (paper: 144);
            must be ``per_device_batch_size * accumulation * world_size``.
        per_device_batch_size: samples per forward pass on one device.
        bf16: use bf16 autocast where the hardware runs it natively (CUDA with bf16, or a CPU
            with AVX512-BF16 or AMX: :func:`train.loop.has_bf16`); ignored, with a log line, elsewhere.
        seed: seeds parameter init, dropout and the per-epoch data order.
        save_every_steps: write a checkpoint every this many optimizer steps (0: never).
        keep_checkpoints: keep only the newest this many checkpoints (0: keep all).
        max_steps: stop after this many optimizer steps (None: run all epochs).
        resume: ``"auto"`` (newest checkpoint of ``output_dir`` if any), ``"none"``,
            or the path of a checkpoint folder.
        num_workers: DataLoader worker processes.
    """

    output_dir: str
    epochs: int = 5
    global_batch_size: int = 144
    per_device_batch_size: int = 4
    bf16: bool = True
    seed: int = 42
    save_every_steps: int = 500
    keep_checkpoints: int = 2
    max_steps: int | None = None
    resume: str = "auto"
    num_workers: int = 0


@dataclass
class LoraSettings:
    """Stage I LoRA (paper: r = 64 on W_q and W_v of the LLM).

    Attributes:
        r: LoRA rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the LoRA input.
        target_modules: projection names inside the language model's attention.
    """

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class MoESettings:
    """Stage II upcycling and which parameters train.

    Attributes:
        num_experts: experts per MoE layer (paper: 8); 1 keeps the model dense (ablation baseline).
        top_k: experts per token (paper: 2).
        moe_layers: decoder layer indices to upcycle; None = every second layer
            (skymoe's default parity).
        aux_loss_coef: alpha in ``loss = lm + alpha * aux``.
        router_mode: ``"token"`` (paper eq. 3-4) or ``"task"`` (plus a per-task bias).
        trainable: ``"llm"`` (default): the whole language model, experts and routers
            included, with CLIP and the projector frozen as in Stage I. The paper says
            all components are optimised in Stage II while it keeps the CLIP encoder
            frozen at 504 px; the dense layers were only LoRA-adapted in Stage I, so
            they train fully here. ``"moe"``: only routers and experts (MoE-LLaVA's
            cheaper recipe); ``"all"``: also the projector and the vision tower.
    """

    num_experts: int = 8
    top_k: int = 2
    moe_layers: list[int] | None = None
    aux_loss_coef: float = 0.01
    router_mode: Literal["token", "task"] = "token"
    trainable: Literal["llm", "moe", "all"] = "llm"


@dataclass
class Stage1Config:
    """``python -m train.stage1 CONFIG``: LoRA on the dense model.

    Attributes:
        model: folder of the base checkpoint (e.g. a converted LLaVA-1.5, 504 px).
    """

    model: str
    data: DataConfig
    loop: LoopConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class Stage2Config:
    """``python -m train.stage2 CONFIG``: upcycle to MoE and fine-tune.

    Attributes:
        model: folder of the Stage I merged checkpoint (dense).
    """

    model: str
    data: DataConfig
    loop: LoopConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    moe: MoESettings = field(default_factory=MoESettings)


def load_config(path: str | Path, cls: type[T], overrides: list[str] | None = None) -> T:
    """Read a YAML file into the dataclass ``cls``, checking every field.

    Args:
        path: the YAML file.
        cls: the config dataclass, e.g. :class:`Stage1Config`.
        overrides: ``"dotted.key=value"`` strings applied on top of the file
            (values parsed as YAML), e.g. ``["loop.max_steps=10"]``.

    Raises:
        ConfigError: unreadable file, bad YAML, missing/unknown field, wrong type.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides, source=str(path))
    return config_from_dict(cls, data, source=str(path))


def apply_overrides(data: dict, overrides: list[str], source: str = "<overrides>") -> dict:
    """Return a copy of ``data`` with ``"a.b=value"`` overrides set (value parsed as YAML)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} for {source}: expected KEY=VALUE, e.g. loop.max_steps=10")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} for {source}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def config_from_dict(cls: type[T], data: Any, source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking fields and types.

    Raises:
        ConfigError: naming the dotted key and ``source``.
    """
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {where!r} must be a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown field {prefix}{unknown[0]} in {where}; allowed: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required field {key!r}")
            continue
        values[name] = _coerce(hints[name], data[name], key, source)
    return cls(**values)


def config_to_dict(cfg: Any) -> dict:
    """The config as plain data (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check ``value`` against the type ``tp`` and convert where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, source, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} = {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {_describe(value)}")
        return {_coerce(args[0], k, f"{key} (key {k!r})", source): _coerce(args[1], v, f"{key}.{k}", source)
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {_describe(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    return _coerce_scalar(tp, value, key, source)


def _coerce_scalar(tp: Any, value: Any, key: str, source: str) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-5" as a string; accept numeric strings for floats only
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool, dict, list) and isinstance(value, tp):  # bare dict/list: contents unchecked
        return value
    raise ConfigError(f"{source}: {key} must be {tp.__name__}, got {_describe(value)}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
