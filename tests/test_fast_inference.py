"""Fast inference: sync-free MoE paths, fast vs plain generate, image-prefix reuse (CPU, tiny models)."""

import numpy as np
import pytest
import torch
from transformers.cache_utils import StaticCache

import skymoe
from skymoe import build_prompt, generate, load_model, render_conversation
from skymoe.generation import set_fast_inference
from skymoe.moe import MOE_IMPLEMENTATIONS, SkyMoESparseBlock, fuse_experts, moe_implementation, set_moe_implementation
from skymoe.prefix import TilePrefix
from skymoe.presets import make_tiny_checkpoint, tiny_config

PROMPTS = [
    build_prompt("count", "small vehicle"),
    build_prompt("ground", "the very long red car parked next to the large grey warehouse"),
    build_prompt("caption"),
]
# larger random weights than the default 0.02 so that answers depend on the image and prompt
PEAKED = {"initializer_range": 0.3}


def _checkpoint(tmp_path_factory, name, **overrides):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(name) / "tiny", seed=11, text_config=PEAKED, **overrides)


@pytest.fixture(scope="module")
def token_model(tmp_path_factory):
    return load_model(_checkpoint(tmp_path_factory, "token"), quant="none", device="cpu")


@pytest.fixture(scope="module")
def task_model(tmp_path_factory):
    loaded = load_model(_checkpoint(tmp_path_factory, "task", router_mode="task"), quant="none", device="cpu")
    with torch.no_grad():  # distinct routing per task, so a prefix encoded under the wrong task would show
        for layer in loaded.model.config.moe_layers:
            loaded.model.model.language_model.layers[layer].mlp.router.task_bias.weight.normal_(0, 2.0)
    return loaded


@pytest.fixture(scope="module")
def question_first_model(tmp_path_factory):
    return load_model(_checkpoint(tmp_path_factory, "question_first", image_after_question=True), quant="none",
                      device="cpu")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in PROMPTS]


def _texts(generations):
    return [g.text for g in generations]


# ----------------------------------------------------------------------------- MoE block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_moe_implementation_computes_the_loop_result(dtype):
    torch.manual_seed(0)
    block = SkyMoESparseBlock(tiny_config(), layer_idx=1).eval().to(dtype)
    x = torch.randn(3, 9, 64, dtype=dtype)
    assert block.fuse_experts()
    outputs = {}
    with torch.no_grad():
        for impl in MOE_IMPLEMENTATIONS:
            block.implementation = impl
            outputs[impl] = block(x).float()
    ref = outputs["loop"]
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for impl, out in outputs.items():
        assert torch.allclose(out, ref, atol=tol * ref.abs().max(), rtol=0), impl
    assert ref.abs().max() > 0.01


def test_fusing_makes_expert_weights_views_of_one_stack_without_changing_anything_else(tmp_path):
    model = skymoe.SkyMoEForConditionalGeneration(tiny_config()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    assert fuse_experts(model) == len(model.config.moe_layers)
    block = model.model.language_model.layers[1].mlp
    stack = block._fused.gate_up
    for index, expert in enumerate(block.experts):  # views into the stack: no second copy of the experts
        assert expert.gate_proj.weight.data_ptr() == stack[index].data_ptr()
        assert type(expert.gate_proj) is torch.nn.Linear
    assert [id(p) for p in model.parameters()] == params_before  # optimizers keep valid references
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model.save_pretrained(tmp_path)  # views of one storage still save as separate safetensors weights
    reloaded = skymoe.SkyMoEForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    assert reloaded.keys() == before.keys() and all(torch.equal(reloaded[k], before[k]) for k in before)
    with torch.no_grad():  # an in-place update of an expert weight is seen by the stacked path
        block.experts[0].down_proj.weight.mul_(2.0)
    assert torch.equal(block._fused.down[0], block.experts[0].down_proj.weight)
    model.to(torch.bfloat16)  # converted weights are no longer views: the stacked paths step aside
    assert not block.is_fused()
    with torch.no_grad():
        assert block.resolved_implementation(4, torch.device("cpu"), torch.bfloat16) == "loop"


def test_lora_applied_after_fusing_is_not_bypassed():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = skymoe.SkyMoEForConditionalGeneration(tiny_config()).eval()
    assert fuse_experts(model) == 2
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the adapters matter
            torch.nn.init.normal_(param, std=0.5)
    block = model.base_model.model.model.language_model.layers[1].mlp
    assert not block.is_fused()  # the experts are LoRA layers now: the stacked weights would skip the adapters
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        auto = block(x)
        block.implementation = "loop"
        assert torch.allclose(auto, block(x), atol=1e-6)
    block.implementation = "auto"
    with torch.no_grad(), pytest.raises(RuntimeError, match="need fused experts"):
        block.implementation = "grouped"
        block(x)


@pytest.mark.parametrize("router_mode", ["token", "task"])
def test_a_whole_decoding_step_traces_without_graph_breaks_on_the_sync_free_paths(router_mode):
    """Capturable for CUDA graphs: a static-cache decoding step of the whole model traces as ONE graph
    (fullgraph=True raises on any .tolist()/.item()/nonzero()) with the grouped_mm MoE path; with the
    task router too (its task-id check is a device assert, not a host round trip)."""
    torch.manual_seed(0)
    model = skymoe.SkyMoEForConditionalGeneration(tiny_config(router_mode=router_mode)).eval().to(torch.bfloat16)
    fuse_experts(model)
    prompt = torch.randint(5, 400, (1, 10))
    extra = {"task_ids": torch.tensor([3])} if router_mode == "task" else {}

    def decoding_step(forward) -> torch.Tensor:
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(input_ids=prompt, cache=cache, cache_position=torch.arange(10), **extra)
        return forward(input_ids=torch.tensor([[7]]), cache=cache, cache_position=torch.tensor([10]),
                       position_ids=torch.tensor([[10]]), attention_mask=torch.ones(1, 11, dtype=torch.long),
                       **extra).logits

    with torch.no_grad():
        with moe_implementation(model, "grouped_mm"):
            eager = decoding_step(model)
            torch._dynamo.reset()
            traced = decoding_step(torch.compile(model, fullgraph=True, backend="eager"))
        assert torch.equal(traced, eager)
        block = model.model.language_model.layers[1].mlp
        x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
        block.implementation = "masked"  # the quantized experts' decoding path traces as one graph too
        torch._dynamo.reset()
        assert torch.equal(torch.compile(block, fullgraph=True, backend="eager")(x), block(x))
        block.implementation = "loop"  # the plain path syncs on the host: the same check must fail
        torch._dynamo.reset()
        with pytest.raises(Exception, match="(?i)data-dependent|tolist|graph break"):
            torch.compile(block, fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()


def test_auto_picks_a_sync_free_path_for_decoding_on_cuda():
    block = SkyMoESparseBlock(tiny_config(), layer_idx=1).eval()
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    with torch.no_grad():
        assert block.resolved_implementation(1, cpu, bf16) == "loop"  # not fused: the plain path
        assert block.resolved_implementation(1, cuda, bf16) == "masked"  # quantized-like experts decoding on CUDA
        block.fuse_experts()  # CPU weights: no grouped_mm kernel
        assert block.resolved_implementation(4096, cpu, bf16) == "grouped"
        assert block.resolved_implementation(8, cuda, bf16) == "masked"  # kernel missing: still no host sync
        assert block.resolved_implementation(4096, cuda, bf16) == "grouped"
    assert block.resolved_implementation(1, cuda, bf16) == "loop"  # autograd on: training uses the plain path


def test_unknown_moe_implementation_is_refused():
    model = skymoe.SkyMoEForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="unknown MoE implementation 'fast'.*grouped_mm"):
        set_moe_implementation(model, "fast")


# ----------------------------------------------------------------------------- fast vs plain generate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_and_plain_generate_give_the_same_tokens(token_model, images, dtype):
    model, processor = token_model
    model.to(dtype)
    try:
        lengths = {len(processor.tokenizer(p).input_ids) for p in PROMPTS}
        assert len(lengths) == len(PROMPTS)  # batched with real left padding
        plain = generate(model, processor, images, PROMPTS, max_new_tokens=6, fast=False)
        fast = generate(model, processor, images, PROMPTS, max_new_tokens=6, fast=True)
        assert len(set(_texts(plain))) == len(PROMPTS)  # answers differ per row: a wrong row would show
        assert _texts(fast) == _texts(plain)
        for f, p in zip(fast, plain):
            assert f.mean_logprob == pytest.approx(p.mean_logprob, abs=1e-3 if dtype == torch.float32 else 5e-2)
        blocks = [m for m in model.modules() if isinstance(m, SkyMoESparseBlock)]
        assert all(b.is_fused() and b.implementation == "auto" for b in blocks)  # fused, setting restored
    finally:
        model.to(torch.float32)


def test_per_model_switch_selects_the_path(token_model, images):
    model, processor = token_model
    calls = []
    block = next(m for m in model.modules() if isinstance(m, SkyMoESparseBlock))
    original = block._mix_loop
    block._mix_loop = lambda *a: calls.append("loop") or original(*a)
    try:
        set_fast_inference(model, False)
        generate(model, processor, images[:1], PROMPTS[:1], max_new_tokens=2)
        assert calls  # plain: the per-expert loop ran
        calls.clear()
        set_fast_inference(model, True)
        generate(model, processor, images[:1], PROMPTS[:1], max_new_tokens=2)
        assert not calls  # fast: the grouped path ran instead
    finally:
        del block._mix_loop
        set_fast_inference(model, True)


def test_quantized_experts_are_not_stacked_and_give_the_same_tokens(tmp_path_factory, images):
    folder = _checkpoint(tmp_path_factory, "q4")
    model, processor = load_model(folder, quant="4bit", device="cpu")
    assert type(model.model.language_model.layers[1].mlp.experts[0].gate_proj).__name__ == "Linear4bit"
    assert fuse_experts(model) == 0  # bitsandbytes weights cannot be stacked: per-expert loop / masked
    plain = generate(model, processor, images[:2], PROMPTS[:2], max_new_tokens=4, fast=False)
    fast = generate(model, processor, images[:2], PROMPTS[:2], max_new_tokens=4, fast=True)
    assert _texts(fast) == _texts(plain)
    with moe_implementation(model, "masked"):  # the sync-free formulation quantized experts decode with on CUDA
        masked = generate(model, processor, images[:2], PROMPTS[:2], max_new_tokens=4, fast=None)
    assert _texts(masked) == _texts(plain)


# ----------------------------------------------------------------------------- prefix reuse


def test_prefix_answers_equal_fresh_generate_per_tile_and_per_question(token_model, images):
    model, processor = token_model
    fresh = generate(model, processor, images, PROMPTS, max_new_tokens=6, fast=False)
    prefix = TilePrefix(model, processor, images)
    assert _texts(prefix.ask(PROMPTS, max_new_tokens=6)) == _texts(fresh)  # one prompt per tile
    same_question = generate(model, processor, images, [PROMPTS[1]] * 3, max_new_tokens=6, fast=False)
    # asked after the first ask: the stored prefix KV was not modified by it
    assert _texts(prefix.ask(PROMPTS[1], max_new_tokens=6)) == _texts(same_question)
    one_tile = TilePrefix(model, processor, images[:1])  # several questions of one tile, padded after the prefix
    many = one_tile.ask(PROMPTS, max_new_tokens=6)
    want = generate(model, processor, [images[0]] * 3, PROMPTS, max_new_tokens=6, fast=False)
    assert _texts(many) == _texts(want)
    for got, expected in zip(many, want):
        assert got.mean_logprob == pytest.approx(expected.mean_logprob, abs=1e-4)


def test_chat_turns_after_the_prefix_equal_a_fresh_conversation(token_model, images):
    model, processor = token_model
    prefix = TilePrefix(model, processor, images[:1])
    first = prefix.ask(PROMPTS[2], max_new_tokens=6)[0]
    history = [(PROMPTS[2], first.text)]
    second = prefix.ask(PROMPTS[0], history=history, max_new_tokens=6)[0]
    text = render_conversation([*history, (PROMPTS[0], None)])
    inputs = processor(images=images[:1], text=[text], return_tensors="pt")
    with torch.no_grad(), moe_implementation(model, "loop"):
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    reference = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert second.text == reference


def test_prefix_tokenizes_a_chat_like_the_processor(token_model, images):
    model, processor = token_model
    prefix = TilePrefix(model, processor, images[:1])
    texts = [render_conversation([(PROMPTS[2], "two ships"), (PROMPTS[0], None)]),
             render_conversation([(PROMPTS[1], None)])]
    expected = processor(images=images[:1] * 2, text=texts, return_tensors="pt", padding=True)
    for row, ids in enumerate(prefix._tokenized(texts)):
        reference = expected["input_ids"][row][expected["attention_mask"][row].bool()]
        assert torch.equal(ids, reference)


def test_second_question_runs_no_vision_and_prefills_only_the_new_text(token_model, images):
    model, processor = token_model
    vision_calls, prefill_lengths = [], []
    hooks = [
        model.model.vision_tower.register_forward_hook(lambda *a: vision_calls.append(1)),
        model.model.language_model.embed_tokens.register_forward_hook(
            lambda _m, args, _o: prefill_lengths.append(args[0].shape[1])),
    ]
    tokenizer = processor.tokenizer
    try:
        prefix = TilePrefix(model, processor, images[:1])
        first = prefix.ask(PROMPTS[0], max_new_tokens=3)[0]
        assert len(vision_calls) == 1 and prefill_lengths[0] == prefix.prefix_length
        expand = lambda text: text.replace("<image>", "<image>" * prefix.num_image_tokens)  # noqa: E731
        turn_one = tokenizer(expand(render_conversation([(PROMPTS[0], None)]))).input_ids
        assert prefill_lengths[1] == len(turn_one) - prefix.prefix_length  # only the text after the image
        vision_calls.clear(), prefill_lengths.clear()
        history = [(PROMPTS[0], first.text)]
        cached = prefix._last_turn.ids  # the first conversation's tokens whose KV was kept
        prefix.ask(PROMPTS[1], history=history, max_new_tokens=1)
    finally:
        for hook in hooks:
            hook.remove()
    turn_two = torch.tensor(tokenizer(expand(render_conversation([*history, (PROMPTS[1], None)]))).input_ids)
    span = min(len(cached), len(turn_two))
    common = int(next((i for i in range(span) if cached[i] != turn_two[i]), span))
    assert common >= len(turn_one)  # the whole first prompt (and what matches of its answer) is reused
    assert vision_calls == [] and prefill_lengths == [len(turn_two) - common]


def _reference(model, processor, image, turns, max_new_tokens=6):
    """Greedy answer of transformers' own ``generate`` on the conversation as the model's layout renders it."""
    text = render_conversation(turns, image_after_question=model.config.image_after_question)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad(), moe_implementation(model, "loop"):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_question_first_model_is_asked_with_the_image_after_the_question(question_first_model, images):
    model, processor = question_first_model
    fresh = generate(model, processor, images, PROMPTS, max_new_tokens=6, fast=False)
    assert _texts(fresh) == [_reference(model, processor, im, [(p, None)]) for im, p in zip(images, PROMPTS)]
    # the image is read after the question: the same weights asked image-first answer otherwise
    model.config.image_after_question = False
    try:
        image_first = generate(model, processor, images, PROMPTS, max_new_tokens=6, fast=False)
    finally:
        model.config.image_after_question = True
    assert _texts(image_first) != _texts(fresh)


def test_question_first_prefix_answers_and_chats_like_fresh_generate(question_first_model, images):
    model, processor = question_first_model
    fresh = generate(model, processor, images, PROMPTS, max_new_tokens=6, fast=False)
    prefix = TilePrefix(model, processor, images)
    assert not (prefix.prefix_ids == model.config.image_token_index).any()  # only the system line is shared
    assert _texts(prefix.ask(PROMPTS, max_new_tokens=6)) == _texts(fresh)
    one_tile = TilePrefix(model, processor, images[:1])
    want = generate(model, processor, [images[0]] * 3, PROMPTS, max_new_tokens=6, fast=False)
    assert _texts(one_tile.ask(PROMPTS, max_new_tokens=6)) == _texts(want)
    first = one_tile.ask(PROMPTS[2], max_new_tokens=6)[0]
    history = [(PROMPTS[2], first.text)]
    second = one_tile.ask(PROMPTS[0], history=history, max_new_tokens=6)[0]  # reuses the first turn's KV
    assert second.text == _reference(model, processor, images[0], [*history, (PROMPTS[0], None)])
    vision_calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *a: vision_calls.append(1))
    try:
        sampled = TilePrefix(model, processor, images[:1]).ask(PROMPTS[1], max_new_tokens=4, do_sample=True)[0]
    finally:
        hook.remove()
    assert vision_calls == [1] and np.isfinite(sampled.mean_logprob)  # sampling reads the tile too


def test_task_router_encodes_the_prefix_per_task(task_model, images):
    model, processor = task_model
    fresh = generate(model, processor, images, PROMPTS, max_new_tokens=6, fast=False)
    prefix = TilePrefix(model, processor, images)
    assert _texts(prefix.ask(PROMPTS, max_new_tokens=6)) == _texts(fresh)
    assert sorted(prefix._kv) == sorted(skymoe.generation.task_ids_for_prompts(PROMPTS).tolist())


def test_prefix_rejects_bad_requests(token_model, images):
    model, processor = token_model
    with pytest.raises(ValueError, match="non-empty list of tiles"):
        TilePrefix(model, processor, [])
    with pytest.raises(ValueError, match="non-empty list of tiles"):
        TilePrefix(model, processor, images[0])
    prefix = TilePrefix(model, processor, images)
    with pytest.raises(ValueError, match="got 2 prompts for a prefix of 3 tiles"):
        prefix.ask(PROMPTS[:2])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        prefix.ask(PROMPTS[0], max_new_tokens=0)
    sampled = prefix.ask(PROMPTS[0], max_new_tokens=3, do_sample=True)  # sampling goes through generate()
    assert len(sampled) == 3 and all(0.0 < g.confidence <= 1.0 for g in sampled)
