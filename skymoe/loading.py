"""Load a SkyMoE folder (safetensors only) with optional bitsandbytes 4-bit / 8-bit quantization.

The folder is validated before anything is loaded: a missing folder, config or weight shard,
a truncated shard, a config of another model type and pickle-only weights each raise a
:class:`~skymoe.errors.CheckpointError` naming the file. Pickles are never opened.
"""

from __future__ import annotations

import json
import logging
import struct
import warnings
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.quantizers.quantizers_utils import should_convert_module

from .configuration import SkyMoEConfig
from .errors import CheckpointError, SkyMoELoadWarning
from .modeling import SkyMoEForConditionalGeneration
from .processing import SkyMoEProcessor

__all__ = ["LoadedModel", "load_model", "check_checkpoint", "check_weight_files", "QUANT_SKIP_MODULES"]

logger = logging.getLogger(__name__)

Quant = Literal["4bit", "8bit", "none"]

#: Module-name patterns bitsandbytes leaves unquantized: routers, vision tower, projector, the
#: object-token modules (the scorer picks the object tokens; the detection heads and the code
#: projection are a few small layers whose input widths are not multiples of 64), LM head.
QUANT_SKIP_MODULES = [
    r"model\.language_model\.layers\.\d+\.mlp\.router",
    "model.vision_tower",
    "model.multi_modal_projector",
    r"model\.object_\w+",
    "lm_head",
]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class LoadedModel(NamedTuple):
    """A model ready for inference (eval mode) and its processor."""

    model: SkyMoEForConditionalGeneration
    processor: SkyMoEProcessor


def load_model(path: str | Path, quant: Quant = "4bit", device: str = "auto") -> LoadedModel:
    """Load a SkyMoE folder for inference.

    ``quant="4bit"``: bitsandbytes NF4 with bfloat16 compute; ``"8bit"``: LLM.int8(). Routers,
    vision tower, projector and LM head stay unquantized (:data:`QUANT_SKIP_MODULES`). On CPU,
    4-bit needs every quantized Linear's input width to be a multiple of 64; where it is not,
    or where bitsandbytes cannot run at all, the model loads unquantized and a
    :class:`~skymoe.errors.SkyMoELoadWarning` is issued (and logged). Unquantized weights are
    float32 on CPU and bfloat16 on CUDA.

    Args:
        path: Folder with ``config.json``, ``model.safetensors`` (or an index + shards) and the
            processor files.
        quant: ``"4bit"``, ``"8bit"`` or ``"none"``.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        ``LoadedModel(model, processor)``, the model in eval mode.

    Raises:
        CheckpointError: The folder is missing, incomplete, pickle-only or not a SkyMoE.
        ValueError: Unknown ``quant`` or ``device``.
    """
    folder = Path(path)
    target = _resolve_device(device)
    if quant not in ("4bit", "8bit", "none"):
        raise ValueError(f"quant must be '4bit', '8bit' or 'none', got {quant!r}")
    config = check_checkpoint(folder)
    processor = _load_processor(folder)
    quant = _feasible_quant(config, quant, target)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    model = _load_weights(folder, quant, target, dtype)
    model.eval()
    logger.info("loaded %s (quant=%s, device=%s)", folder, quant, target)
    return LoadedModel(model, processor)


def check_checkpoint(folder: Path) -> SkyMoEConfig:
    """Validate a SkyMoE folder without loading weights.

    Args:
        folder: The checkpoint folder.

    Returns:
        Its config.

    Raises:
        CheckpointError: Naming the missing/bad file and what to do.
    """
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist (or is not a folder)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: not a transformers model folder")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
    model_type = raw.get("model_type")
    if model_type != "skymoe":
        hint = " Convert it with skymoe.convert_llava(src_dir, out_dir)." if model_type == "llava" else ""
        raise CheckpointError(f"{config_file} has model_type={model_type!r}, expected 'skymoe'.{hint}")
    check_weight_files(folder)
    return SkyMoEConfig.from_pretrained(folder)


def check_weight_files(folder: Path) -> None:
    """Check that every safetensors shard is present and complete; refuse pickle-only folders.

    Raises:
        CheckpointError: Naming the missing, truncated or pickle file.
    """
    index_file = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_file} is not a safetensors index (no 'weight_map'): {err}") from err
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"weight shard {folder / shard} listed in {index_file.name} is missing")
            keys = _safetensors_keys(folder / shard)
            absent = [k for k, f in weight_map.items() if f == shard and k not in keys]
            if absent:
                raise CheckpointError(f"{folder / shard} lacks {len(absent)} tensors of the index, e.g. {absent[0]}")
    elif single.is_file():
        _safetensors_keys(single)
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); SkyMoE refuses to unpickle "
                "checkpoints (unpickling runs arbitrary code). Convert them once, in a trusted environment: "
                "AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=False)"
                ".save_pretrained(new_folder)  # writes model.safetensors"
            )
        raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def _safetensors_keys(file: Path) -> set[str]:
    """Tensor names of a safetensors file, after checking its header and that it is not truncated."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from err
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{file} is truncated: {size} bytes on disk, {8 + header_len + data_end} expected (re-copy the file)"
        )
    return set(header)


def _load_processor(folder: Path) -> SkyMoEProcessor:
    """The processor saved with the model; its files must be there."""
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(f"{folder} has no tokenizer ({' or '.join(_TOKENIZER_FILES)})")
    if not (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{folder} has no processor_config.json / preprocessor_config.json (image processor)")
    try:
        return SkyMoEProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot load the processor files in {folder}: {err}") from err


def _resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; validates explicit names."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return target


def _fallback(reason: str) -> Quant:
    """Announce an unquantized fallback (warning + log) and return ``"none"``."""
    message = f"{reason}; loading the model unquantized instead"
    warnings.warn(SkyMoELoadWarning(message), stacklevel=3)
    logger.warning(message)
    return "none"


def _feasible_quant(config: SkyMoEConfig, quant: Quant, target: torch.device) -> Quant:
    """``quant``, or ``"none"`` (with a warning) where bitsandbytes cannot run it here."""
    if quant == "none":
        return quant
    try:
        import bitsandbytes  # noqa: F401  (availability probe only)
    except ImportError as err:
        return _fallback(f"quant={quant!r} needs bitsandbytes, which cannot be imported ({err})")
    if quant == "4bit" and target.type == "cpu":
        narrow = _linears_not_multiple_of_64(config)
        if narrow:
            shown = ", ".join(f"{name} (in_features={n})" for name, n in narrow[:3])
            return _fallback(
                f"4-bit on CPU needs every quantized Linear's input width to be a multiple of 64; "
                f"{len(narrow)} are not, e.g. {shown}"
            )
    return quant


def _linears_not_multiple_of_64(config: SkyMoEConfig) -> list[tuple[str, int]]:
    """``(module name, in_features)`` of the Linears 4-bit would quantize whose width is not a multiple of 64."""
    with torch.device("meta"):
        skeleton = SkyMoEForConditionalGeneration(config)
    return [
        (name, module.in_features)
        for name, module in skeleton.named_modules()
        if isinstance(module, nn.Linear)
        and should_convert_module(name, QUANT_SKIP_MODULES)
        and module.in_features % 64
    ]


def _quantization_config(quant: Quant) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for ``quant`` (``None`` for ``"none"``)."""
    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=list(QUANT_SKIP_MODULES),
        )
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(QUANT_SKIP_MODULES))
    return None


def _load_weights(folder: Path, quant: Quant, target: torch.device, dtype: torch.dtype) -> SkyMoEForConditionalGeneration:
    """``from_pretrained`` from safetensors; a failing bitsandbytes load falls back to unquantized."""
    try:
        model, info = SkyMoEForConditionalGeneration.from_pretrained(
            folder,
            use_safetensors=True,
            dtype=dtype,
            device_map={"": str(target)},
            quantization_config=_quantization_config(quant),
            output_loading_info=True,
        )
    except (RuntimeError, NotImplementedError, ImportError) as err:
        if quant == "none":
            raise
        _fallback(f"bitsandbytes could not load quant={quant!r} on {target} ({type(err).__name__}: {err})")
        return _load_weights(folder, "none", target, dtype)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise CheckpointError(f"{folder} lacks {len(missing)} weights the config needs, e.g. {missing[:3]}")
    if info["unexpected_keys"]:
        unexpected = sorted(info["unexpected_keys"])
        logger.warning("%s holds %d weights the model does not use, e.g. %s", folder, len(unexpected), unexpected[:3])
    return model
