"""SkyMoE: a Mixture-of-Experts vision-language model for remote sensing, built on transformers.

Importing :mod:`skymoe` registers ``model_type="skymoe"`` with transformers' Auto classes
(AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor) so ``from_pretrained``
works on SkyMoE folders; this registration is the package's only import-time action.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration import SkyMoEConfig
from .conversion import convert_llava
from .errors import CheckpointError, SkyMoEConfigError, SkyMoEError, SkyMoELoadWarning
from .generation import Generation, fast_inference_enabled, generate, set_fast_inference
from .loading import LoadedModel, load_model
from .modeling import (
    SkyMoECausalLMOutputWithPast,
    SkyMoEForConditionalGeneration,
    SkyMoEModel,
    SkyMoEPreTrainedModel,
)
from .moe import RouterOutput, SkyMoERouter, SkyMoESparseBlock, load_balancing_loss
from .parsing import Box, ParsedAnswer, parse_answer
from .prefix import TilePrefix
from .presets import full_size_config, make_tiny_checkpoint, tiny_config
from .processing import SkyMoEProcessor, to_rgb_image
from .routing import LayerRouting, RoutingTrace, capture_routing
from .prompts import (
    TASK_IDS,
    TASKS,
    VICUNA_CHAT_TEMPLATE,
    TaskSpec,
    build_prompt,
    chat_template,
    format_boxes,
    render_conversation,
    task_of_prompt,
)
from .summary import ModelSummary, model_summary
from .tokenization import build_tokenizer
from .upcycling import upcycle

__all__ = [
    # prompts and answers
    "TASKS",
    "TASK_IDS",
    "TaskSpec",
    "VICUNA_CHAT_TEMPLATE",
    "chat_template",
    "build_prompt",
    "render_conversation",
    "task_of_prompt",
    "format_boxes",
    "Box",
    "ParsedAnswer",
    "parse_answer",
    # model
    "SkyMoEConfig",
    "SkyMoEPreTrainedModel",
    "SkyMoEModel",
    "SkyMoEForConditionalGeneration",
    "SkyMoECausalLMOutputWithPast",
    "RouterOutput",
    "SkyMoERouter",
    "SkyMoESparseBlock",
    "load_balancing_loss",
    "upcycle",
    "convert_llava",
    "load_model",
    "generate",
    "Generation",
    "set_fast_inference",
    "fast_inference_enabled",
    "TilePrefix",
    "capture_routing",
    "RoutingTrace",
    "LayerRouting",
    "model_summary",
    "ModelSummary",
    "LoadedModel",
    # processing
    "SkyMoEProcessor",
    "to_rgb_image",
    "build_tokenizer",
    # presets
    "tiny_config",
    "full_size_config",
    "make_tiny_checkpoint",
    # errors
    "SkyMoEError",
    "CheckpointError",
    "SkyMoEConfigError",
    "SkyMoELoadWarning",
]


def _register_auto_classes() -> None:
    """Register SkyMoE with the transformers Auto classes (idempotent)."""
    AutoConfig.register("skymoe", SkyMoEConfig, exist_ok=True)
    AutoModel.register(SkyMoEConfig, SkyMoEModel, exist_ok=True)
    AutoModelForImageTextToText.register(SkyMoEConfig, SkyMoEForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(SkyMoEConfig, SkyMoEProcessor, exist_ok=True)


_register_auto_classes()
