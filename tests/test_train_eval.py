"""train.eval: scoring wiring, the masking-test summary, the params/FLOPs report and the CLI."""

from __future__ import annotations

import json

import pytest
from train_samples import write_instruction_jsonl

import skymoe
from train import eval as ev
from train.eval import SampleResult, _masking_summary, params_flops_report, score_results


def _res(i, task, pred, ref, gran="local"):
    return SampleResult(id=f"s{i}", task=task, granularity=gran, prompt="p", prediction=pred, references=ref,
                        confidence=0.5)


def test_scores_per_task_and_granularity():
    results = [
        _res(0, "ground", "{<0><0><50><50>|<0>}", ["{<0><0><50><50>|<0>}"]),  # IoU 1
        _res(1, "ground", "{<0><0><50><50>|<0>}", ["{<0><0><50><40>|<0>}"]),  # IoU 0.8
        _res(2, "ground", "{<0><0><50><50>|<0>}", ["{<0><0><50><30>|<0>}"]),  # IoU 0.6
        _res(3, "ground", "no box here", ["{<0><0><50><30>|<0>}"]),  # miss
        _res(4, "count", "There are 4.", ["4"]),
        _res(5, "count", "5", ["4"]),
        _res(6, "count", "seven", ["4"]),
        _res(7, "classify", "This is a Tennis-Court.", ["tennis court"], "global"),
        _res(8, "classify", "harbor", ["airport"], "global"),
        _res(9, "vqa", "Yes, there is.", ["yes"], "global"),
        _res(10, "vqa", "two", ["2"], "local"),
    ]
    sizes = {r.id: (200, 100) for r in results}
    report = score_results(results, sizes)
    assert report.per_task["ground"]["acc@0.5"] == pytest.approx(75.0)
    assert report.per_task["ground"]["acc@0.7"] == pytest.approx(50.0)
    assert results[1].score == pytest.approx(0.8)
    assert report.per_task["count"]["exact"] == pytest.approx(100 / 3)
    assert report.per_task["count"]["within1"] == pytest.approx(200 / 3)
    assert report.per_task["classify"]["accuracy"] == 50.0
    assert report.per_task["vqa"]["accuracy"] == 100.0
    assert report.per_task_granularity["vqa/local"]["n"] == 1
    assert report.per_granularity["global"]["n"] == 3  # 2 classify + 1 vqa
    # local: mean of the primary metrics of ground (acc@0.5), count (exact) and local vqa
    assert report.per_granularity["local"]["mean_primary"] == pytest.approx((75.0 + 100 / 3 + 100.0) / 3)
    assert "ground/local" in ev.format_table(report)


def test_masking_summary_compares_with_the_unmasked_count():
    rows = [{"scene": "a", "n": 5, "k": 0, "predicted": 5}, {"scene": "a", "n": 5, "k": 1, "predicted": 4},
            {"scene": "a", "n": 5, "k": 2, "predicted": 5},  # clings to the context
            {"scene": "b", "n": 3, "k": 0, "predicted": 4}, {"scene": "b", "n": 3, "k": 1, "predicted": 3}]
    summary = _masking_summary(rows)
    assert summary["variants"] == 3
    assert summary["drop_equals_k"] == pytest.approx(200 / 3)
    assert summary["unchanged"] == pytest.approx(100 / 3)
    assert summary["correct"] == pytest.approx(100 / 3)  # only a/k=1 equals N - k
    assert summary["mean_drop_per_masked"] == pytest.approx(2 / 4)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    folder = skymoe.make_tiny_checkpoint(tmp_path_factory.mktemp("moe"), num_experts=4)
    return folder, skymoe.load_model(folder, quant="none", device="cpu")


def test_params_flops_report_counts_lora_and_stage2_choices(tiny_moe):
    _, (model, processor) = tiny_moe
    report = params_flops_report(model, processor, [], lora_r=64)
    text = model.config.text_config
    kv = text.num_key_value_heads * text.hidden_size // text.num_attention_heads
    per_layer = 64 * (text.hidden_size * 2) + 64 * (text.hidden_size + kv)  # q: D->D, v: D->kv
    assert report["stage1_lora_trainable"] == text.num_hidden_layers * per_layer
    total = sum(p.numel() for p in model.parameters())
    assert report["total_params"] == total
    s2 = report["stage2_trainable"]
    assert s2["all"] == total and 0 < s2["moe"] < s2["llm"] < s2["all"]
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert report["active_llm_params_per_token"] < sum(
        p.numel() for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n)
    assert experts > 0 and report["forward_tflops_per_sample"] > 0
    assert report["train_tflops_per_sample"] == pytest.approx(3 * report["forward_tflops_per_sample"])


def test_cli_runs_batched_inference_and_writes_metrics(tmp_path, tiny_moe, capsys):
    folder, _ = tiny_moe
    items = [("count", "ship", "3"), ("ground", "the red car", "{<1><2><30><40>|<0>}"),
             ("classify", None, "harbor"), ("vqa", "Is there a ship?", "yes"), ("count", "plane", "1")]
    lines = write_instruction_jsonl(tmp_path, items, size_px=64).read_text().splitlines()
    lines.insert(2, "{broken")
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval" / "metrics.json"
    code = ev.main(["--model", str(folder), "--data", str(tmp_path / "test.jsonl"), "--out", str(out),
                    "--batch-size", "2", "--max-new-tokens", "6", "--report-params"])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["skipped_lines"] == [3]
    assert metrics["per_task"]["count"]["n"] == 2 and set(metrics["per_task"]) == {"count", "ground", "classify", "vqa"}
    assert 0 <= metrics["per_task"]["ground"]["acc@0.5"] <= 100
    assert metrics["params_flops"]["stage1_lora_trainable"] > 0
    predictions = out.with_suffix(".predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 5
    assert "count/local" in capsys.readouterr().out


def test_cli_refuses_a_folder_of_another_model(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    data = write_instruction_jsonl(tmp_path, [("count", "ship", "2")])
    code = ev.main(["--model", str(other), "--data", str(data), "--out", str(tmp_path / "m.json")])
    assert code == 2
    assert f"cannot evaluate {other}" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    code = ev.main(["--model", str(other), "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "m.json")])
    assert code == 2
    assert "empty.jsonl: the file is empty" in capsys.readouterr().err


def test_synthetic_benchmark_has_one_query_per_task_per_scene(tmp_path):
    from train.dataset import read_instruction_jsonl

    path = ev.build_synthetic_benchmark(tmp_path / "bench", 5, seed=3)
    records, bad = read_instruction_jsonl(path)  # images exist, lines valid
    assert not bad and len({r.image_path for r in records}) == 1
    captions = [r for r in records if r.task == "caption"]
    assert sorted(r.task for r in records if r.task != "caption") == sorted(set(skymoe.TASK_IDS) - {"caption"})
    # all four templated captions of the scene, pooled by the evaluation into one query
    assert len(captions) == 4 and len({r.answer for r in captions}) == 4
    queries = ev.group_queries(records)
    assert sorted(recs[0].task for recs, _ in queries) == sorted(skymoe.TASK_IDS)
    assert next(len(recs) for recs, _ in queries if recs[0].task == "caption") == 4
    ground = next(r for r in records if r.task == "ground")
    assert skymoe.parse_answer("ground", ground.answer, 504).boxes  # a parseable reference box


def test_masking_test_zero_fills_k_objects_of_the_counted_class(tmp_path, tiny_moe, monkeypatch):
    _, (model, processor) = tiny_moe
    seen = {}
    real_generate = skymoe.generate

    def spy(model_, processor_, images, prompts, **kwargs):  # the real generate, recording its inputs
        seen["images"], seen["prompts"] = images, prompts
        return real_generate(model_, processor_, images, prompts, **kwargs)

    monkeypatch.setattr(skymoe, "generate", spy)
    result = ev.masking_test(model, processor, tmp_path, n_scenes=2, seed=5, batch_size=4)
    rows = result["rows"]
    assert rows and len(rows) == len(seen["images"]) == len(seen["prompts"])
    for row, image, prompt in zip(rows, seen["images"], seen["prompts"]):
        assert prompt == skymoe.build_prompt("count", row["label"])
        assert 0 <= row["k"] <= min(3, row["n"] - 1)
        zeros = int((image == 0).all(axis=-1).sum())
        if row["k"] == 0:
            base = zeros
        else:
            assert zeros > base  # each further masked object blacks out more pixels
            base = zeros
    assert "variants" in result["summary"]
