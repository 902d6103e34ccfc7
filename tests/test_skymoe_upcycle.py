"""Upcycling: a dense model and its E=8, k=2 upcycled version give the same logits at initialisation."""

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from skymoe import SkyMoEForConditionalGeneration, tiny_config
from skymoe.moe import SkyMoESparseBlock
from skymoe.upcycling import upcycle


def _batch(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.text_config.vocab_size - 2, (2, 40), generator=g)
    ids[:, 1 : 1 + config.image_seq_length] = config.image_token_index
    pixels = torch.randn(2, 3, config.vision_config.image_size, config.vision_config.image_size, generator=g)
    return ids, pixels


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return SkyMoEForConditionalGeneration(tiny_config(moe_layers=[])).eval()


def test_upcycled_logits_equal_dense_logits(dense):
    moe = upcycle(dense, num_experts=8, num_experts_per_tok=2)
    assert moe.config.moe_layers == [1, 3] and moe.config.num_experts == 8
    assert all(isinstance(moe.model.language_model.layers[i].mlp, SkyMoESparseBlock) for i in (1, 3))
    ids, pixels = _batch(dense.config)
    with torch.no_grad():
        dense_logits = dense(input_ids=ids, pixel_values=pixels).logits
        moe_logits = moe(input_ids=ids, pixel_values=pixels).logits
    max_diff = (dense_logits - moe_logits).abs().max().item()
    print(f"upcycled vs dense: max |logit diff| = {max_diff:.3e} (fp32)")
    assert max_diff <= 1e-5
    # the router really is non-trivial (small random init), yet the output is unchanged
    assert moe.model.language_model.layers[1].mlp.router.gate.weight.abs().sum() > 0


def test_experts_are_clones_of_the_dense_ffn_and_input_is_untouched(dense):
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle(dense, num_experts=4, moe_layers=[0, 3])
    dense_mlp = dense.model.language_model.layers[3].mlp
    for expert in moe.model.language_model.layers[3].mlp.experts:
        assert torch.equal(expert.down_proj.weight, dense_mlp.down_proj.weight)
        assert expert.down_proj.weight.data_ptr() != dense_mlp.down_proj.weight.data_ptr()
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())
    assert not isinstance(dense.model.language_model.layers[3].mlp, SkyMoESparseBlock)


def test_plain_llava_upcycles_exactly_with_a_zero_router():
    config = tiny_config()
    torch.manual_seed(1)
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=config.vision_config.to_dict(),
            text_config=config.text_config.to_dict(),
            image_token_index=config.image_token_index,
        )
    ).eval()
    moe = upcycle(llava, num_experts=8, router_init_std=0.0)
    ids, pixels = _batch(config, seed=2)
    with torch.no_grad():
        diff = (llava(input_ids=ids, pixel_values=pixels).logits - moe(input_ids=ids, pixel_values=pixels).logits)
    assert diff.abs().max().item() <= 1e-5
    assert moe.config.model_type == "skymoe"


def test_upcycle_rejects_moe_and_foreign_models(dense):
    moe = upcycle(dense, num_experts=2)
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle(moe, num_experts=8)
    with pytest.raises(TypeError, match="expects a LlavaForConditionalGeneration"):
        upcycle(torch.nn.Linear(2, 2), num_experts=8)
    with pytest.raises(ValueError, match="num_experts >= 2"):
        upcycle(dense, num_experts=1)
    with pytest.raises(ValueError, match="out of range"):
        upcycle(dense, num_experts=8, moe_layers=[9])
