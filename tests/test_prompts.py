"""Prompt table, Vicuna-v1 rendering, chat template and answer formatters (skymoe.prompts)."""

from __future__ import annotations

import logging

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from skymoe.prompts import (
    TASK_IDS,
    TASKS,
    VICUNA_CHAT_TEMPLATE,
    chat_template,
    VICUNA_SYSTEM,
    build_prompt,
    code_of_task,
    format_boxes,
    format_count,
    render_conversation,
    task_of_code,
    task_of_prompt,
)

SYSTEM_LINE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def test_task_table_matches_contract() -> None:
    assert TASK_IDS == ("caption", "classify", "vqa", "ground", "count")
    assert set(TASKS) == set(TASK_IDS)
    codes = {name: spec.code for name, spec in TASKS.items()}
    assert codes == {"caption": "IC", "classify": "SC", "vqa": "VQA", "ground": "VG", "count": "OC"}
    tags = {name: spec.tag for name, spec in TASKS.items()}
    assert tags == {
        "caption": "[caption]",
        "classify": "[classify]",
        "vqa": "[vqa]",
        "ground": "[refer]",
        "count": "[count]",
    }
    granularity = {name: spec.granularity for name, spec in TASKS.items()}
    assert granularity == {
        "caption": "global",
        "classify": "global",
        "vqa": "global",
        "ground": "local",
        "count": "local",
    }
    for name, spec in TASKS.items():
        assert spec.name == name
        assert spec.templates[0] == spec.template
        for template in spec.templates:
            assert template.startswith(spec.tag + " ")
            assert ("{query}" in template) == spec.needs_query


def test_build_prompt_examples() -> None:
    assert build_prompt("count", "small vehicle") == "[count] How many small vehicle are there?"
    assert build_prompt("ground", "  the red car ") == "[refer] Where is <p>the red car</p>?"
    assert build_prompt("caption") == "[caption] Describe the image in detail."
    assert build_prompt("classify") == "[classify] Which scene does this image belong to?"
    assert build_prompt("vqa", "Is there a runway?").startswith("[vqa] Is there a runway?")


@pytest.mark.parametrize("task", TASK_IDS)
def test_every_template_renders_and_tags_back(task: str) -> None:
    query = "storage tank" if TASKS[task].needs_query else None
    for index in range(len(TASKS[task].templates)):
        prompt = build_prompt(task, query, template_index=index)
        assert task_of_prompt(prompt) == task
        assert task_of_prompt("<image>\n" + prompt) == task
        if query:
            assert query in prompt


@pytest.mark.parametrize("task", ["segment", "Count", "", "VG", None])
def test_build_prompt_unknown_task_lists_allowed(task: object) -> None:
    with pytest.raises(ValueError, match="allowed tasks: caption, classify, vqa, ground, count"):
        build_prompt(task)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("task", "query", "needs"),
    [
        ("vqa", None, "a question"),
        ("vqa", "   ", "a question"),
        ("ground", "", "a referring expression"),
        ("count", None, "a class name"),
    ],
)
def test_build_prompt_missing_query(task: str, query: str | None, needs: str) -> None:
    with pytest.raises(ValueError, match=f"task '{task}' needs {needs}"):
        build_prompt(task, query)


def test_build_prompt_extra_query_warns_and_bad_input_raises(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="skymoe.prompts"):
        assert build_prompt("caption", "ships") == TASKS["caption"].template
    assert "task 'caption' takes no query; ignoring 'ships'" in caplog.text
    with pytest.raises(ValueError, match="query must be a string"):
        build_prompt("count", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="template_index 9 out of range"):
        build_prompt("count", "ship", template_index=9)
    assert build_prompt("caption", "  ") == TASKS["caption"].template  # blank counts as none


def test_task_of_prompt_tags() -> None:
    assert task_of_prompt("[REFER] Where is <p>x</p>?") == "ground"
    assert task_of_prompt("[grounding] Describe the image with boxes.") == "ground"
    assert task_of_prompt("[identify] What is in {<1><2><3><4>}?") is None
    assert task_of_prompt("How many ships?") is None
    assert task_of_prompt(None) is None  # type: ignore[arg-type]
    assert task_of_prompt(render_conversation([("[count] How many ship are there?", None)])) == "count"


def test_codes_round_trip() -> None:
    for task in TASK_IDS:
        assert task_of_code(code_of_task(task)) == task
    assert task_of_code("vg") == "ground"
    with pytest.raises(ValueError, match="allowed codes: IC, SC, VQA, VG, OC"):
        task_of_code("DET")
    with pytest.raises(ValueError, match="unknown task 'detect'"):
        code_of_task("detect")


def test_render_conversation_exact_text() -> None:
    assert VICUNA_SYSTEM == SYSTEM_LINE
    one = render_conversation([("[caption] Describe the image in detail.", None)])
    assert one == SYSTEM_LINE + " USER: <image>\n[caption] Describe the image in detail. ASSISTANT:"
    two = render_conversation([("q1", "a1"), ("q2", None)])
    assert two == SYSTEM_LINE + " USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    train = render_conversation([("q1", "a1")], add_generation_prompt=False)
    assert train == SYSTEM_LINE + " USER: <image>\nq1 ASSISTANT: a1</s>"
    no_gen = render_conversation([("q1", None)], add_generation_prompt=False)
    assert no_gen == SYSTEM_LINE + " USER: <image>\nq1 "
    # A JSONL human value already carries the image line: not doubled.
    assert render_conversation([("<image>\nq1", None)]) == render_conversation([("q1", None)])


def test_image_after_question_moves_only_the_first_turns_image() -> None:
    two = render_conversation([("q1", "a1"), ("q2", None)], image_after_question=True)
    assert two == SYSTEM_LINE + " USER: q1\n<image> ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    # A JSONL human value's image line moves after the question; no second image appears.
    for jsonl_value in ("<image>\nq1", "q1<image>", "<image>q1"):
        assert render_conversation([(jsonl_value, None)], image_after_question=True) == (
            SYSTEM_LINE + " USER: q1\n<image> ASSISTANT:")


@pytest.mark.parametrize("image_after_question", [False, True])
@pytest.mark.parametrize("turns", [[("q1", "a1")], [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]])
def test_generation_prompt_is_a_prefix_of_the_answered_text(turns: list[tuple[str, str]],
                                                            image_after_question: bool) -> None:
    """Training masks labels by this: the prompt up to "ASSISTANT:" is a prefix of the full text."""
    layout = {"image_after_question": image_after_question}
    full = render_conversation(turns, add_generation_prompt=False, **layout)
    for i, (user, answer) in enumerate(turns):
        head = render_conversation([*turns[:i], (user, None)], **layout)
        upto = render_conversation(turns[: i + 1], add_generation_prompt=False, **layout)
        assert full.startswith(upto) and upto.startswith(head)
        assert upto[len(head) :] == f" {answer}</s>"


def test_render_conversation_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        render_conversation([])
    with pytest.raises(ValueError, match="turn 0: only the last turn may lack an answer"):
        render_conversation([("q1", None), ("q2", None)])
    with pytest.raises(ValueError, match="turn 1: user text must be a string"):
        render_conversation([("q1", "a1"), (None, None)])  # type: ignore[list-item]


def _messages(turns: list[tuple[str, str | None]], *, typed: bool = False) -> list[dict]:
    messages: list[dict] = []
    for index, (user, assistant) in enumerate(turns):
        if typed:
            items = [{"type": "image"}] if index == 0 else []
            messages.append({"role": "user", "content": items + [{"type": "text", "text": user}]})
        else:
            messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    return messages


CONVERSATIONS = [
    [("[count] How many small vehicle are there?", None)],
    [("[count] How many small vehicle are there?", "3")],
    [("[refer] Where is <p>the ship</p>?", "{<89><47><97><55>|<58>}"), ("[vqa] Is it big?", None)],
    [("[caption] Describe the image in detail.", "A port."), ("q2 it's \"quoted\"", "a2"), ("q3", None)],
    [("[classify] Which scene does this image belong to?", "airport"), ("q2", "a2"), ("q3", "a3")],
]


def _environments() -> list[jinja2.Environment]:
    """Plain jinja2, and the settings transformers' apply_chat_template uses (trim/lstrip blocks)."""
    hf_like = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    hf_like.globals["raise_exception"] = raise_exception
    return [jinja2.Environment(), hf_like]


@pytest.mark.parametrize("image_after_question", [False, True])
@pytest.mark.parametrize("turns", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_render_conversation(turns: list, add_generation_prompt: bool,
                                                  image_after_question: bool) -> None:
    expected = render_conversation(turns, add_generation_prompt, image_after_question=image_after_question)
    assert chat_template() == VICUNA_CHAT_TEMPLATE
    for env in _environments():
        template = env.from_string(chat_template(image_after_question))
        for typed in (False, True):
            messages = _messages(turns, typed=typed)
            text = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
            assert text == expected, (type(env).__name__, typed)


def test_chat_template_system_message_and_bad_role() -> None:
    env = _environments()[1]
    template = env.from_string(VICUNA_CHAT_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    text = template.render(messages=messages, add_generation_prompt=True)
    assert text == render_conversation([("q", None)], system="Be brief.")
    with pytest.raises(jinja2.TemplateError, match="unsupported role tool"):
        template.render(messages=[{"role": "tool", "content": "x"}], add_generation_prompt=True)


def test_tokenizer_apply_chat_template_gives_the_same_text() -> None:
    """Through transformers' public apply_chat_template (a tiny offline word-level tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "<s>": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
        chat_template=VICUNA_CHAT_TEMPLATE,
    )
    for turns in CONVERSATIONS:
        for typed in (False, True):
            messages = _messages(turns, typed=typed)
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert text == render_conversation(turns)


def test_format_boxes_geochat_syntax() -> None:
    text = format_boxes([(89, 47, 97, 55), (50.4, 24.2, 53.6, 28.0)], angles=[58, 57.6])
    assert text == "{<89><47><97><55>|<58>}{<50><24><54><28>|<58>}"
    assert format_boxes([(0, 0, 100, 100)]) == "{<0><0><100><100>|<0>}"
    assert format_boxes([]) == ""
    # Thinner than a grid unit: kept one unit wide instead of collapsing.
    thin = format_boxes([(10.1, 20.0, 10.3, 30.0), (99.8, 5, 100, 6)])
    assert thin == "{<10><20><11><30>|<0>}{<99><5><100><6>|<0>}"


@pytest.mark.parametrize(
    ("boxes", "angles", "match"),
    [
        ([(10, 10, 120, 20)], None, "x2 = 120.0 is not on the 0-100 grid"),
        ([(-1, 10, 20, 20)], None, "x1 = -1.0 is not on the 0-100 grid"),
        ([(30, 10, 20, 20)], None, "corners reversed"),
        ([(1, 2, 3)], None, "expected \\(x1, y1, x2, y2\\), got 3 values"),
        ([(1, 2, 3, float("nan"))], None, "y2 = nan"),
        ([(1, 2, 3, 4)], [1, 2], "got 2 angles for 1 boxes"),
        ([(1, 2, 3, 4)], [float("inf")], "angle inf is not finite"),
    ],
)
def test_format_boxes_rejects_bad_boxes(boxes: list, angles: list | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        format_boxes(boxes, angles)


def test_format_count() -> None:
    assert format_count(3) == "3"
    assert format_count(0) == "0"
    for bad, match in ((-1, "must be >= 0"), (2.0, "got float"), (True, "got bool"), ("3", "got str")):
        with pytest.raises(ValueError, match=match):
            format_count(bad)  # type: ignore[arg-type]
