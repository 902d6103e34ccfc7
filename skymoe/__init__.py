"""SkyMoE: a Mixture-of-Experts vision-language model for remote sensing, built on transformers.

Importing :mod:`skymoe` registers ``model_type="skymoe"`` with transformers' Auto classes
(AutoConfig, AutoModel, AutoModelForImageTextToText) so ``from_pretrained`` works on SkyMoE
folders; this registration is the package's only import-time action.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration import SkyMoEConfig
from .errors import CheckpointError, SkyMoEConfigError, SkyMoEError, SkyMoELoadWarning
from .modeling import (
    SkyMoECausalLMOutputWithPast,
    SkyMoEForConditionalGeneration,
    SkyMoEModel,
    SkyMoEPreTrainedModel,
)
from .moe import RouterOutput, SkyMoERouter, SkyMoESparseBlock, load_balancing_loss
from .presets import full_size_config, tiny_config
from .upcycling import upcycle

__all__ = [
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
    "tiny_config",
    "full_size_config",
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


_register_auto_classes()
