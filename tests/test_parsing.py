"""Answer parsing (skymoe.parsing): GeoChat boxes, counts, labels, and never raising."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skymoe.parsing import Box, ParsedAnswer, parse_answer
from skymoe.prompts import TASK_IDS, format_boxes, format_count

GEOCHAT = "{<89><47><97><55>|<58>}{<50><24><54><28>|<58>}"


def _xyxy(boxes: list[Box]) -> list[tuple[float, ...]]:
    return [tuple(round(v, 6) for v in box.xyxy_px) for box in boxes]


def test_geochat_example_on_504_tile() -> None:
    parsed = parse_answer("ground", GEOCHAT, 504)
    assert parsed.issues == []
    # grid value * 504 / 100: 89 -> 448.56, 47 -> 236.88, ...
    assert _xyxy(parsed.boxes) == [(448.56, 236.88, 488.88, 277.2), (252.0, 120.96, 272.16, 141.12)]
    assert [box.angle_deg for box in parsed.boxes] == [58.0, 58.0]
    assert parsed.answer == ""
    assert parse_answer("ground", GEOCHAT, (504, 504)).boxes == parsed.boxes


def test_non_square_tile_scales_x_by_width_and_y_by_height() -> None:
    parsed = parse_answer("ground", "{<10><20><30><40>}", (200, 100))
    assert _xyxy(parsed.boxes) == [(20.0, 20.0, 60.0, 40.0)]
    assert parsed.boxes[0].angle_deg == 0.0


@pytest.mark.parametrize(
    "text",
    [
        "{<10><20><30><40>}",
        "{ <10> <20> <30> <40> | <0> }",
        "{<10>, <20>, <30>, <40>|0}",
        "{10 20 30 40}",
        "<10><20><30><40>",
        "[10, 20, 30, 40]",
        "[0.1, 0.2, 0.3, 0.4]",
        "<p>the ship</p> {<10><20><30><40>|<0>}</s>",
    ],
)
def test_tolerant_box_variants(text: str) -> None:
    parsed = parse_answer("ground", text, 100)
    assert _xyxy(parsed.boxes) == [(10.0, 20.0, 30.0, 40.0)], parsed.issues


def test_fractions_are_noted_and_integers_stay_grid_values() -> None:
    fractions = parse_answer("ground", "[0.1, 0.2, 0.3, 0.4]", 100)
    assert any("0-1 read as fractions" in issue for issue in fractions.issues)
    grid = parse_answer("ground", "{<0><0><1><1>}", 500)
    assert _xyxy(grid.boxes) == [(0.0, 0.0, 5.0, 5.0)]
    assert grid.issues == []


def test_fixups_clamp_swap_and_drop_with_issues() -> None:
    text = "{<120><50><10><60>|<5>}{<30><30><30><40>}{<-5><0><20><20>}{<1><2><3>}{}"
    parsed = parse_answer("ground", text, 100)
    assert _xyxy(parsed.boxes) == [(10.0, 50.0, 100.0, 60.0), (0.0, 0.0, 20.0, 20.0)]
    assert parsed.boxes[0].angle_deg == 5.0
    joined = " | ".join(parsed.issues)
    assert "value 120 outside the 0-100 grid, clamped to 100" in joined
    assert "reversed corners swapped" in joined
    assert "box 2 '{<30><30><30><40>}': zero area" in joined
    assert "value -5 outside the 0-100 grid, clamped to 0" in joined
    assert "box 4 '{<1><2><3>}': expected 4 numbers" in joined
    assert "box 5 '{}': expected 4 numbers x1 y1 x2 y2, found 0" in joined


def test_grounding_without_boxes_and_bad_tile_size() -> None:
    parsed = parse_answer("ground", "I cannot see it.", 504)
    assert parsed.boxes == []
    assert parsed.answer == "I cannot see it."
    assert "no valid box found in the grounding answer" in parsed.issues
    for bad_size in (0, -504, (504,), (504, 0), 1e12, float("nan"), "504", None, True):
        bad = parse_answer("ground", GEOCHAT, bad_size)  # type: ignore[arg-type]
        assert bad.boxes == []
        assert any(f"tile_size {bad_size!r} is not a size in pixels" in issue for issue in bad.issues)
    assert _xyxy(parse_answer("ground", GEOCHAT, 504.0).boxes) == _xyxy(parse_answer("ground", GEOCHAT, 504).boxes)


def test_issue_messages_stay_short() -> None:
    parsed = parse_answer("ground", "{" + "<1>" * 5000 + "}", 504)
    assert parsed.boxes == []
    assert len(parsed.issues) == 2 and all(len(issue) < 200 for issue in parsed.issues)
    assert "expected 4 numbers x1 y1 x2 y2, found 5000" in parsed.issues[0]


def test_round_trip_format_boxes_parse_answer() -> None:
    boxes_norm100 = [(89, 47, 97, 55), (0, 0, 100, 100), (12, 3, 45, 6)]
    angles = [58, 0, -30]
    parsed = parse_answer("ground", format_boxes(boxes_norm100, angles), (1000, 500))
    assert parsed.issues == []
    expected = [(x1 * 10, y1 * 5, x2 * 10, y2 * 5) for x1, y1, x2, y2 in boxes_norm100]
    assert _xyxy(parsed.boxes) == [tuple(float(v) for v in box) for box in expected]
    assert [box.angle_deg for box in parsed.boxes] == angles


@given(
    st.lists(
        st.tuples(*(st.integers(0, 99),) * 2, *(st.integers(1, 100),) * 2, st.integers(-90, 90)),
        max_size=6,
    ),
    st.integers(1, 4096),
)
def test_round_trip_property(raw: list[tuple[int, int, int, int, int]], size: int) -> None:
    boxes = [(x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)) for x1, y1, x2, y2, _ in raw]
    angles = [angle for *_, angle in raw]
    parsed = parse_answer("count", format_boxes(boxes, angles), size)
    assert parsed.issues == ([] if boxes else ["empty answer", "no count found in ''"])
    assert len(parsed.boxes) == len(boxes)
    for box, (x1, y1, x2, y2), angle in zip(parsed.boxes, boxes, angles):
        assert box.xyxy_px == pytest.approx((x1 * size / 100, y1 * size / 100, x2 * size / 100, y2 * size / 100))
        assert box.angle_deg == angle
    assert parsed.count == len(boxes) if boxes else parsed.count is None


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("3", 3),
        (format_count(17), 17),
        ("There are 12 storage tanks.", 12),
        ("three", 3),
        ("Twelve.", 12),
        ("There are twenty-one planes", 21),
        ("one hundred and five", 105),
        ("zero", 0),
        ("No.", 0),
        ("There are none.", 0),
        ("No, there are three ships.", 3),
    ],
)
def test_counts_in_digits_and_words(text: str, count: int) -> None:
    parsed = parse_answer("count", text, 504)
    assert parsed.count == count
    assert parsed.answer == str(count)


def test_count_from_boxes_and_conflicts() -> None:
    assert parse_answer("count", GEOCHAT, 504).count == 2
    both = parse_answer("count", "3 " + GEOCHAT, 504)
    assert both.count == 3 and len(both.boxes) == 2
    assert any("differs from the 2 boxes" in issue for issue in both.issues)
    several = parse_answer("count", "There are 3 planes and 2 ships", 504)
    assert several.count == 3
    assert any("several numbers [3, 2]" in issue for issue in several.issues)
    nothing = parse_answer("count", "I am not sure.", 504)
    assert nothing.count is None and nothing.answer == ""
    assert any("no count found" in issue for issue in nothing.issues)
    huge = parse_answer("count", "9" * 5000, 504)
    assert huge.count is None
    assert any("implausibly large" in issue for issue in huge.issues)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("airport", "airport"),
        ("Tennis-Court.", "tennis court"),
        ("dense_residential", "dense residential"),
        ("The scene is airport.", "airport"),
        ("This is a parking lot.", "parking lot"),
        ("It is an aerial image of a harbor. Many boats are moored.", "harbor"),
        ("The image shows a baseball field", "baseball field"),
        ("Category: Storage Tank!", "storage tank"),
    ],
)
def test_classify_labels(text: str, label: str) -> None:
    parsed = parse_answer("classify", text, 504)
    assert parsed.label == label
    assert parsed.answer == label
    assert parsed.issues == []


def test_classify_with_nothing_left() -> None:
    parsed = parse_answer("classify", "This is a.", 504)
    assert parsed.label is None
    assert any("no class name left" in issue for issue in parsed.issues)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Yes", "yes"),
        ("Yes, there is a runway.", "yes"),
        ("NO.", "no"),
        ("Three.", "3"),
        ("The answer is: a runway", "runway"),
        ("  Bottom left ", "bottom left"),
    ],
)
def test_vqa_short_answers(text: str, answer: str) -> None:
    assert parse_answer("vqa", text, 504).answer == answer


def test_caption_unknown_task_and_non_string() -> None:
    caption = parse_answer("caption", "  Many ships are docked at the port.</s>", 504)
    assert caption.answer == "Many ships are docked at the port."
    assert caption.issues == ["removed a trailing '</s>' end-of-sequence token"]
    unknown = parse_answer("detect", " a car ", 504)
    assert unknown.task == "detect" and unknown.answer == "a car"
    assert any("unknown task 'detect'; allowed tasks: caption" in issue for issue in unknown.issues)
    none_text = parse_answer("count", None, 504)  # type: ignore[arg-type]
    assert none_text.count is None
    assert "answer is not a string but NoneType; read as empty" in none_text.issues
    assert "empty answer" in parse_answer("caption", "   ", 504).issues


_NASTY = st.sampled_from(
    [
        "{", "}", "{{", "}}", "<", ">", "|", "[", "]", ",", ".", "-", "NaN", "nan", "inf", "-inf", "1e400",
        "9" * 400, "0.5", "100", "101", "-3", "<p>", "</p>", "</s>", "three", "twenty", "hundred", "no",
        "[refer]", "{<1><2><3><4>|<5>}", "<1><2><3><4>", "[0.1,0.2,0.3,0.4]", "🛰", "\u0663", "\x00", "\n",
    ]
)
_ANSWER_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(_NASTY, st.text(max_size=5)), max_size=30).map("".join),
)
_TILE = st.one_of(
    st.integers(-5, 5000),
    st.tuples(st.integers(-5, 5000), st.integers(-5, 5000)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.just((504,)),
)


def _assert_consistent(parsed: ParsedAnswer, tile: object) -> None:
    assert isinstance(parsed, ParsedAnswer)
    assert not any(issue.startswith("internal parser error") for issue in parsed.issues), parsed.issues
    assert all(isinstance(issue, str) and issue for issue in parsed.issues)
    assert isinstance(parsed.answer, str)
    assert parsed.count is None or parsed.count >= 0
    width, height = tile if isinstance(tile, tuple) and len(tile) == 2 else (tile, tile)
    for box in parsed.boxes:
        assert 0 <= box.x1_px < box.x2_px <= width
        assert 0 <= box.y1_px < box.y2_px <= height
        assert math.isfinite(box.angle_deg)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([*TASK_IDS, "unknown"]), _ANSWER_TEXT, _TILE)
def test_parse_answer_never_raises(task: str, text: str, tile: object) -> None:
    _assert_consistent(parse_answer(task, text, tile), tile)  # type: ignore[arg-type]


@given(st.one_of(st.none(), st.integers(), st.binary(max_size=20), st.lists(st.text(max_size=3), max_size=3)))
def test_parse_answer_never_raises_on_non_text(value: object) -> None:
    parsed = parse_answer("ground", value, 504)  # type: ignore[arg-type]
    assert any("not a string" in issue for issue in parsed.issues)
    weird_task = parse_answer(value, "{<1><2><3><4>}", 504)  # type: ignore[arg-type]
    assert any("unknown task" in issue for issue in weird_task.issues)
