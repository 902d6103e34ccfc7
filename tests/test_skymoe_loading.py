"""Saving and loading: exact round trip, safetensors only, clear errors for broken folders, 4-bit fallback."""

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import skymoe
from skymoe import CheckpointError, SkyMoELoadWarning, load_model
from skymoe.presets import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _batch(model):
    config = model.config
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 1 : 1 + config.image_seq_length] = config.image_token_index
    size = config.vision_config.image_size
    return ids, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_save_then_load_reproduces_logits_exactly_from_safetensors_only(tmp_path):
    torch.manual_seed(0)
    model = skymoe.SkyMoEForConditionalGeneration(skymoe.tiny_config(router_mode="task")).eval()
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.router.task_bias.weight.normal_()  # non-trivial trained state
    src = make_tiny_checkpoint(tmp_path / "proc")  # borrow its processor files
    model.save_pretrained(tmp_path / "saved")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        shutil.copy(src / name, tmp_path / "saved" / name)
    names = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert "model.safetensors" in names
    loaded = load_model(tmp_path / "saved", quant="none", device="cpu")
    ids, pixels = _batch(model)
    task_ids = torch.tensor([0, 4])
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels, task_ids=task_ids).logits
        after = loaded.model(input_ids=ids, pixel_values=pixels, task_ids=task_ids).logits
    assert torch.equal(before, after)
    assert isinstance(loaded.processor, skymoe.SkyMoEProcessor) and not loaded.model.training


def test_missing_folder_and_config(tmp_path, tiny_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere", quant="none")
    broken = _copy(tiny_dir, tmp_path)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_model(broken, quant="none")


def test_missing_processor_files_are_named(tmp_path, tiny_dir):
    broken = _copy(tiny_dir, tmp_path)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer \(tokenizer\.json or tokenizer\.model\)"):
        load_model(broken, quant="none")


def test_other_model_type_is_refused_with_a_conversion_hint(tmp_path, tiny_dir):
    broken = _copy(tiny_dir, tmp_path)
    raw = json.loads((broken / "config.json").read_text())
    raw["model_type"] = "llava"
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model_type='llava', expected 'skymoe'.*convert_llava"):
        load_model(broken, quant="none")


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path, tiny_dir):
    broken = _copy(tiny_dir, tmp_path)
    (broken / "model.safetensors").unlink()
    # a file that would run code if unpickled: the loader must not open it
    (broken / "pytorch_model.bin").write_bytes(b"\x80\x04cposix\nsystem\n(S'touch PWNED'\ntR.")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\).*refuses to unpickle"):
        load_model(broken, quant="none")
    assert not (tmp_path / "PWNED").exists()


def test_missing_and_truncated_shards_are_named(tmp_path, tiny_dir):
    sharded = _copy(tiny_dir, tmp_path, "sharded")
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    keys = sorted(tensors)
    half = len(keys) // 2
    save_file({k: tensors[k] for k in keys[:half]}, sharded / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({k: tensors[k] for k in keys[half:]}, sharded / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    load_model(sharded, quant="none", device="cpu")  # the complete sharded folder loads
    second = sharded / "model-00002-of-00002.safetensors"
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors is truncated"):
        load_model(sharded, quant="none")
    second.unlink()
    with pytest.raises(CheckpointError, match=r"weight shard .*model-00002-of-00002\.safetensors.* is missing"):
        load_model(sharded, quant="none")


def test_weights_missing_from_the_file_are_reported(tmp_path, tiny_dir):
    partial = _copy(tiny_dir, tmp_path)
    tensors = load_file(partial / "model.safetensors")
    dropped = [k for k in tensors if ".mlp.experts.3." in k]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks \d+ weights the config needs.*experts\.3"):
        load_model(partial, quant="none", device="cpu")


def test_bad_quant_and_device_values():
    with pytest.raises(ValueError, match="quant must be '4bit', '8bit' or 'none'"):
        load_model("anywhere", quant="3bit")
    with pytest.raises(ValueError, match="device must be"):
        load_model("anywhere", quant="none", device="tpu")


def test_4bit_on_cpu_quantizes_experts_but_not_router_vision_projector_head(tiny_dir):
    loaded = load_model(tiny_dir, quant="4bit", device="cpu")
    inner = loaded.model.model
    assert type(inner.language_model.layers[1].mlp.experts[0].gate_proj).__name__ == "Linear4bit"
    assert type(inner.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    for module in (inner.language_model.layers[1].mlp.router.gate, inner.multi_modal_projector.linear_1, loaded.model.lm_head):
        assert type(module) is torch.nn.Linear
    assert not any("Linear4bit" == type(m).__name__ for m in inner.vision_tower.modules())
    # model_summary counts packed 4-bit weights logically: same totals as the fp32 model
    full = skymoe.model_summary(skymoe.SkyMoEForConditionalGeneration(loaded.model.config))
    nf4 = skymoe.model_summary(loaded.model)
    assert nf4.quantization == "4bit"
    assert str(nf4).endswith(f"{nf4.dtype} outside the 4bit Linear layers")  # not the packed weights' dtype
    assert (nf4.total_params, nf4.active_params_per_token) == (full.total_params, full.active_params_per_token)


def test_4bit_on_cpu_with_narrow_layers_falls_back_with_a_warning(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "narrow", text_config={"hidden_size": 96})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(folder, quant="4bit", device="cpu")
    messages = [str(w.message) for w in caught if issubclass(w.category, SkyMoELoadWarning)]
    assert len(messages) == 1 and "multiple of 64" in messages[0] and "in_features=96" in messages[0]
    assert not any(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())


def test_8bit_on_cpu_loads_int8_linears_and_runs(tiny_dir):
    loaded = load_model(tiny_dir, quant="8bit", device="cpu")
    inner = loaded.model.model
    assert type(inner.language_model.layers[1].mlp.experts[0].up_proj).__name__ == "Linear8bitLt"
    assert type(inner.language_model.layers[1].mlp.router.gate) is torch.nn.Linear
    ids, pixels = _batch(loaded.model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes warns that it casts inputs to fp16
        logits = loaded.model(input_ids=ids[:1], pixel_values=pixels[:1]).logits
    assert torch.isfinite(logits).all()


def test_missing_bitsandbytes_falls_back_with_a_warning(tiny_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.warns(SkyMoELoadWarning, match="needs bitsandbytes, which cannot be imported"):
        loaded = load_model(tiny_dir, quant="8bit", device="cpu")
    assert skymoe.model_summary(loaded.model).quantization == "none"
