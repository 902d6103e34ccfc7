"""SkyMoE model core: config validation, sparse MoE block, aux loss, loss composition, task routing."""

import pytest
import torch
import torch.nn.functional as F

import skymoe
from skymoe import SkyMoEConfig, SkyMoEForConditionalGeneration, load_balancing_loss, tiny_config
from skymoe.moe import SkyMoESparseBlock, record_router_outputs


def _inputs(config: SkyMoEConfig, batch: int = 2, text_len: int = 12, seed: int = 0):
    """Random image + text batch: ``[bos, <image> x N, text...]`` with left padding on row 1."""
    g = torch.Generator().manual_seed(seed)
    n_img = config.image_seq_length
    vocab = config.text_config.vocab_size
    text = torch.randint(5, vocab - 2, (batch, text_len), generator=g)
    ids = torch.cat([torch.zeros(batch, 1, dtype=torch.long), torch.full((batch, n_img), config.image_token_index), text], 1)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    mask = torch.ones_like(ids)
    mask[1, :0] = 0
    return ids, pixels, mask


def _model(seed: int = 0, **overrides) -> SkyMoEForConditionalGeneration:
    torch.manual_seed(seed)
    return SkyMoEForConditionalGeneration(tiny_config(**overrides)).eval()


def test_default_moe_layers_are_every_second_odd_layer():
    assert tiny_config(text_config={"num_hidden_layers": 6}).moe_layers == [1, 3, 5]
    assert skymoe.full_size_config().moe_layers == list(range(1, 32, 2))
    assert tiny_config(num_experts=1).moe_layers == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"moe_layers": [0, 4]}, r"moe_layers \[4\] out of range.*4 decoder layers"),
        ({"moe_layers": [-1]}, r"moe_layers \[-1\] out of range"),
        ({"num_experts": 4, "num_experts_per_tok": 5}, r"num_experts_per_tok must lie in \[1, num_experts=4\]"),
        ({"num_experts": 1, "moe_layers": [1]}, r"needs num_experts >= 2"),
        ({"image_seq_length": 576}, r"image_seq_length=576 but the vision tower gives 16 image tokens"),
        ({"image_position_embedding": "2d", "vision_feature_select_strategy": "full"},
         r'image_position_embedding="2d" .* needs vision_feature_select_strategy="default"'),
    ],
)
def test_bad_config_fields_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_moe_layers_hold_sparse_blocks_of_linear_llama_mlps():
    model = _model()
    layers = model.model.language_model.layers
    for idx, layer in enumerate(layers):
        is_moe = isinstance(layer.mlp, SkyMoESparseBlock)
        assert is_moe == (idx in model.config.moe_layers)
    block = layers[1].mlp
    assert len(block.experts) == 8
    assert all(isinstance(e.gate_proj, torch.nn.Linear) for e in block.experts)


def test_each_token_runs_exactly_k_experts_and_idle_experts_do_not_run():
    torch.manual_seed(0)
    config = tiny_config(num_experts=8, num_experts_per_tok=2)
    block = SkyMoESparseBlock(config, layer_idx=1).eval()
    with torch.no_grad():  # positive inputs and negative gate rows: no token picks experts 5, 6, 7
        block.router.gate.weight[5:] = -1.0
    hidden = torch.randn(3, 7, 64).abs()
    rows_seen: dict[int, int] = {}
    handles = [
        expert.register_forward_hook(lambda m, a, o, i=i: rows_seen.__setitem__(i, rows_seen.get(i, 0) + a[0].shape[0]))
        for i, expert in enumerate(block.experts)
    ]
    with record_router_outputs(block) as routing:
        out = block(hidden)
    for h in handles:
        h.remove()
    top_k = routing[1][0].top_k_index
    assert out.shape == hidden.shape
    assert top_k.shape == (21, 2)
    assert (top_k[:, 0] != top_k[:, 1]).all()
    counts = torch.bincount(top_k.reshape(-1), minlength=8)
    # every expert ran on exactly the tokens routed to it, total 2 per token; idle experts never ran
    assert sum(rows_seen.values()) == 2 * 21
    assert {i: rows_seen.get(i, 0) for i in range(8)} == {i: int(c) for i, c in enumerate(counts)}
    assert all(i not in rows_seen for i in (5, 6, 7))


def test_moe_output_is_the_weighted_sum_of_the_selected_experts():
    torch.manual_seed(1)
    block = SkyMoESparseBlock(tiny_config(), layer_idx=1).eval()
    hidden = torch.randn(2, 5, 64)
    with torch.no_grad(), record_router_outputs(block) as routing:
        out = block(hidden).reshape(10, 64)
    r = routing[1][0]
    flat = hidden.reshape(10, 64)
    expected = torch.stack(
        [sum(r.top_k_weights[t, j] * block.experts[int(r.top_k_index[t, j])](flat[t]) for j in range(2)) for t in range(10)]
    )
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.top_k_weights.sum(-1), torch.ones(10))
    assert r.probs.dtype == torch.float32


def test_aux_loss_equals_e_sum_f_g_recomputed_from_router_probs():
    model = _model()
    config = model.config
    ids, pixels, mask = _inputs(config)
    mask[1, :6] = 0  # left padding on row 1
    labels = ids.clone()
    labels[:, : 1 + config.image_seq_length] = -100
    with record_router_outputs(model) as routing:
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
    keep = mask.reshape(-1).bool()
    per_layer = []
    for idx in config.moe_layers:
        probs = routing[idx][0].probs.detach()[keep]  # (real tokens, E)
        frac = torch.bincount(probs.argmax(-1), minlength=8).float() / probs.shape[0]
        per_layer.append(8 * (frac * probs.mean(0)).sum())
    expected = torch.stack(per_layer).mean()
    torch.testing.assert_close(out.aux_loss, expected)
    # padding really is excluded: counting the padded tokens changes the value
    unmasked = load_balancing_loss([routing[i][0].probs.detach() for i in config.moe_layers], 8)
    assert not torch.isclose(unmasked, expected)


def test_aux_loss_reads_one_for_balanced_and_e_for_collapsed_routing():
    uniform = torch.full((10, 8), 1 / 8)
    collapsed = F.one_hot(torch.zeros(10, dtype=torch.long), 8).float()
    assert load_balancing_loss([uniform] * 3, 8).item() == pytest.approx(1.0)
    assert load_balancing_loss([collapsed] * 5, 8).item() == pytest.approx(8.0)


def test_loss_is_lm_loss_on_answer_tokens_plus_alpha_aux():
    model = _model(router_aux_loss_coef=0.5)
    ids, pixels, mask = _inputs(model.config)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    manual_lm = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, manual_lm)
    torch.testing.assert_close(out.loss, manual_lm + 0.5 * out.aux_loss)
    out.loss.backward()
    assert model.model.language_model.layers[1].mlp.router.gate.weight.grad.abs().sum() > 0


def test_dense_model_has_no_aux_loss():
    model = _model(moe_layers=[])
    ids, pixels, mask = _inputs(model.config)
    out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=ids)
    assert out.aux_loss is None
    torch.testing.assert_close(out.loss, out.lm_loss)


def test_task_router_bias_starts_at_zero_and_steers_routing_per_task():
    model = _model(router_mode="task")
    ids, pixels, mask = _inputs(model.config)
    router = model.model.language_model.layers[1].mlp.router
    assert torch.count_nonzero(router.task_bias.weight) == 0
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        tasked = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, task_ids=torch.tensor([0, 3])).logits
        torch.testing.assert_close(plain, tasked)  # zero bias: identical to the token router
        router.task_bias.weight[3] = torch.linspace(-20, 20, 8)  # task 3 prefers experts 6, 7
        with record_router_outputs(model) as routing:
            model(input_ids=ids, pixel_values=pixels, attention_mask=mask, task_ids=torch.tensor([0, 3]))
    top = routing[1][0].top_k_index.reshape(2, -1, 2)
    assert (top[1].sort(-1).values == torch.tensor([6, 7])).all()
    assert not (top[0].sort(-1).values == torch.tensor([6, 7])).all()


def test_bad_task_ids_are_rejected():
    model = _model(router_mode="task")
    ids, pixels, mask = _inputs(model.config)
    with pytest.raises(ValueError, match=r"task_ids out of range.*got \[7\]"):
        model(input_ids=ids, pixel_values=pixels, task_ids=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        model(input_ids=ids, pixel_values=pixels, task_ids=torch.tensor([0]))


def test_full_size_layout_builds_on_meta_device():
    config = skymoe.full_size_config()
    with torch.device("meta"):
        model = SkyMoEForConditionalGeneration(config)
    assert config.vision_config.image_size == 504 and config.image_seq_length == 1296
    assert model.model.vision_tower.embeddings.position_embedding.weight.shape == (1297, 1024)
    assert len(config.moe_layers) == 16 and config.num_experts == 8 and config.num_experts_per_tok == 2
    total = sum(p.numel() for p in model.parameters())
    assert 22.0e9 < total < 22.5e9


def test_2d_position_embedding_tells_identical_patches_apart_and_trains():
    """image_position_embedding="2d": token (r, c) = projector MLP + [column[c], row[r]], codes at init."""
    from skymoe.position_codes import patch_grid_codes

    plain, placed = _model(), _model(image_position_embedding="2d")
    projector = placed.model.multi_modal_projector
    side, half = placed.config.image_grid_size, placed.config.text_config.hidden_size // 2
    assert torch.equal(projector.column_embedding, patch_grid_codes(side, half))
    assert not hasattr(plain.model.multi_modal_projector, "column_embedding")

    # the same vision feature at every patch: only the position embeddings can tell the patches apart
    features = torch.randn(1, 1, placed.config.vision_config.hidden_size).expand(1, side * side, -1)
    with torch.no_grad():
        plain_tokens = plain.model.multi_modal_projector(features)[0]
        placed_tokens = projector(features)[0]
    assert torch.allclose(plain_tokens, plain_tokens[0].expand_as(plain_tokens))
    offsets = (placed_tokens - placed_tokens[0]).reshape(side, side, 2 * half)  # relative to patch (0, 0)
    for r, c in [(0, 3), (2, 1), (3, 3)]:
        assert torch.allclose(offsets[r, c, :half], projector.column_embedding[c] - projector.column_embedding[0], atol=1e-5)
        assert torch.allclose(offsets[r, c, half:], projector.row_embedding[r] - projector.row_embedding[0], atol=1e-5)
    assert offsets[1:, 0].abs().amax() > 0.1 and offsets[0, 1:].abs().amax() > 0.1  # rows and columns differ

    ids, pixels, mask = _inputs(placed.config)
    placed.train()
    placed(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=ids).loss.backward()
    assert projector.column_embedding.grad.abs().sum() > 0 and projector.row_embedding.grad.abs().sum() > 0


def test_2d_position_embedding_survives_upcycling_saving_and_4bit_loading(tmp_path):
    from skymoe.upcycling import upcycle

    dense = _model(image_position_embedding="2d", moe_layers=[], num_experts=1)
    with torch.no_grad():
        dense.model.multi_modal_projector.row_embedding.mul_(3.0)  # a trained value, not the init
    moe = upcycle(dense, num_experts=8, num_experts_per_tok=2)
    assert torch.equal(moe.model.multi_modal_projector.row_embedding, dense.model.multi_modal_projector.row_embedding)

    folder = skymoe.make_tiny_checkpoint(tmp_path / "ckpt", image_position_embedding="2d")
    saved = SkyMoEForConditionalGeneration.from_pretrained(folder).model.multi_modal_projector
    loaded = skymoe.load_model(folder, quant="4bit", device="cpu").model
    assert loaded.config.image_position_embedding == "2d"
    projector = loaded.model.multi_modal_projector
    assert torch.equal(projector.column_embedding.float(), saved.column_embedding)
    assert torch.equal(projector.row_embedding.float(), saved.row_embedding)
