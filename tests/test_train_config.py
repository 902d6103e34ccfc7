"""Training configs: the shipped YAMLs hold the paper's settings; bad files fail naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import ConfigError, Stage1Config, Stage2Config, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs"

_MINIMAL = """\
model: base
data: {train_jsonl: data.jsonl}
loop: {output_dir: out}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_hold_paper_settings():
    s1 = load_config(CONFIGS / "stage1.yaml", Stage1Config)
    s2 = load_config(CONFIGS / "stage2.yaml", Stage2Config)
    for cfg in (s1, s2):
        assert cfg.optim.lr == pytest.approx(2e-5)
        assert cfg.loop.global_batch_size == 144
        assert cfg.loop.epochs == 5
        assert cfg.loop.bf16 is True
    assert (s1.lora.r, sorted(s1.lora.target_modules)) == (64, ["q_proj", "v_proj"])
    assert (s2.moe.num_experts, s2.moe.top_k, s2.moe.moe_layers) == (8, 2, None)
    assert s2.moe.trainable == "llm"
    assert s2.model == s1.loop.output_dir + "/merged"


def test_minimal_config_gets_defaults_and_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, _MINIMAL), Stage2Config, ["loop.max_steps=7", "optim.lr=1e-4"])
    assert cfg.loop.max_steps == 7 and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.moe.router_mode == "token"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: {train_jsonl: d.jsonl}\nloop: {output_dir: o}\n", r"missing required field 'model'"),
        ("model: m\ndata: {}\nloop: {output_dir: o}\n", r"missing required field 'data.train_jsonl'"),
        (_MINIMAL + "optim: {lr: fast}\n", r"optim.lr must be float, got str 'fast'"),
        (_MINIMAL.replace("out}", "out, epochs: 2.5}"), r"loop.epochs must be int, got float 2.5"),
        (_MINIMAL.replace("out}", "out, bf16: 1}"), r"loop.bf16 must be bool, got int 1"),
        (_MINIMAL + "moe: {router_mode: expert}\n", r"moe.router_mode = 'expert' is not allowed; choose one of"),
        (_MINIMAL + "moe: {moe_layers: [1, x]}\n", r"moe.moe_layers\[1\] must be int"),
        (_MINIMAL + "moe: {num_expert: 4}\n", r"unknown field moe.num_expert"),
        (_MINIMAL + "optim: 3\n", r"section 'optim' must be a mapping"),
        ("- just\n- a list\n", r"top level must be a mapping"),
        ("model: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, Stage2Config)
    assert str(path) in str(info.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", Stage1Config)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(_write(tmp_path, _MINIMAL), Stage1Config, ["loop.max_steps"])


def test_stage_commands_report_config_errors(tmp_path, capsys):
    from train.stage1 import main as stage1_main
    from train.stage2 import main as stage2_main

    path = _write(tmp_path, _MINIMAL.replace("out}", "out, per_device_batch_size: four}"))
    assert stage1_main([str(path)]) == 2
    assert stage2_main([str(path), "--set", "moe.top_k=2"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"error: {path}: loop.per_device_batch_size must be int, got str 'four'") == 2


def test_dict_fields_are_checked(tmp_path):
    from dataclasses import dataclass, field

    from train.config import config_from_dict

    @dataclass
    class Quota:
        turns: dict[str, int] = field(default_factory=dict)

    assert config_from_dict(Quota, {"turns": {"VG": 2, "OC": 3}}).turns == {"VG": 2, "OC": 3}
    with pytest.raises(ConfigError, match=r"x.yaml: turns.OC must be int, got str 'many'"):
        config_from_dict(Quota, {"turns": {"OC": "many"}}, source="x.yaml")
    with pytest.raises(ConfigError, match="turns must be a mapping"):
        config_from_dict(Quota, {"turns": [1]}, source="x.yaml")


def test_bare_dict_and_list_fields_accept_their_type_and_refuse_others():
    import dataclasses

    from train.config import ConfigError, config_from_dict

    @dataclasses.dataclass
    class Loose:
        table: dict = dataclasses.field(default_factory=dict)
        items: list = dataclasses.field(default_factory=list)

    assert config_from_dict(Loose, {"table": {"a": 1}, "items": [1, "x"]}) == Loose({"a": 1}, [1, "x"])
    with pytest.raises(ConfigError, match="table must be dict"):
        config_from_dict(Loose, {"table": [1]})
