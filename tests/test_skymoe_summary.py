"""model_summary: total and active-per-token parameter counts, quantization, full-size layout on meta."""

import torch

import skymoe
from skymoe import SkyMoEForConditionalGeneration, model_summary, tiny_config


def test_tiny_counts_match_a_manual_count():
    model = SkyMoEForConditionalGeneration(tiny_config(num_experts=8, num_experts_per_tok=2))
    summary = model_summary(model)
    expert = model.model.language_model.layers[1].mlp.experts[0]
    per_expert = sum(p.numel() for p in expert.parameters())
    assert per_expert == 3 * 64 * 128
    total = sum(p.numel() for p in model.parameters())
    assert summary.total_params == total
    assert summary.active_params_per_token == total - 2 * (8 - 2) * per_expert  # 2 MoE layers, 6 idle experts each
    assert (summary.num_experts, summary.moe_layers, summary.quantization) == (8, [1, 3], "none")
    assert summary.device == "cpu" and summary.dtype == "torch.float32"


def test_dense_model_is_fully_active():
    summary = model_summary(SkyMoEForConditionalGeneration(tiny_config(moe_layers=[])))
    assert summary.active_params_per_token == summary.total_params and summary.num_experts == 1


def test_full_size_parameter_counts_on_meta():
    with torch.device("meta"):
        model = SkyMoEForConditionalGeneration(skymoe.full_size_config())
    summary = model_summary(model)
    print(f"full size: total {summary.total_params:,} parameters, active per token {summary.active_params_per_token:,}")
    # 7.06 B dense LLaVA-1.5-7B + 16 layers x 7 extra experts x 135.3 M (3 x 4096 x 11008)
    ffn = 3 * 4096 * 11008
    with torch.device("meta"):
        dense = SkyMoEForConditionalGeneration(skymoe.full_size_config(num_experts=1, moe_layers=[]))
    dense_total = model_summary(dense).total_params
    routers = 16 * 8 * 4096
    assert summary.total_params == dense_total + 16 * 7 * ffn + routers
    assert summary.active_params_per_token == dense_total + 16 * 1 * ffn + routers
    assert summary.device == "meta" and summary.moe_layers == list(range(1, 32, 2))
