"""Fuzzing the import parsers: arbitrary input yields rows or problems, never another exception."""

import copy
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from slimloop.data.coco_import import coco_to_split
from slimloop.data.yolo_labels import parse_label_bytes, parse_label_text
from slimloop.errors import Problem, SlimloopError

SOURCE = "labels/x.txt"
FAST = settings(deadline=None, database=None)

KEYS = ["id", "image_id", "category_id", "bbox", "name", "file_name", "width", "iscrowd", "images", ""]
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 5), st.sampled_from([2**70, -(10**400), 10**400]),
    st.floats(), st.sampled_from(["", "a", "0", "a.jpg", "ü x"]),
)
json_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS), children, max_size=4),
    max_leaves=5,
)


def mostly(good: st.SearchStrategy, junk: st.SearchStrategy | None = None) -> st.SearchStrategy:
    """``good`` nine times in ten, else ``junk`` (any scalar by default)."""
    junk = leaves if junk is None else junk
    return st.integers(0, 9).flatmap(lambda k: good if k < 9 else junk)


tokens = st.one_of(
    st.sampled_from(["0", "1", "2", "5", "-1", "1.0", "1.5", "0.5", "0.25", "0.9995", "1.0005", "1.2", "0", "-0.1",
                     "nan", "-inf", "1e400", "1e-9", "-0.0005", "0.8", "1_0", "0x1", "٣", "", ".", "-", "a", "\x00", "\r"]),
    st.floats(-0.2, 1.2).map(lambda v: f"{v:.4f}"),
    st.floats().map(repr),
)
center = mostly(st.floats(0.2, 0.8).map(lambda v: f"{v:.6f}"), tokens)
side = mostly(st.floats(0.001, 0.4).map(lambda v: f"{v:.6f}"), tokens)
near_valid_lines = st.tuples(mostly(st.sampled_from(["0", "1", "2", "1.0"]), tokens), center, center,
                             side, side).map(" ".join)
label_lines = mostly(near_valid_lines, st.lists(tokens, max_size=7).map(" ".join))
label_texts = st.lists(label_lines, max_size=6).map("\n".join)


def check_parse(text: str, nc: int, rows: np.ndarray, problems: list[Problem]) -> None:
    """Every non-blank line gives one row or some problems; rows are valid boxes."""
    assert rows.shape[1] == 5 and np.isfinite(rows).all()
    assert all(p.file == SOURCE and isinstance(p.message, str) for p in problems)
    lines = text.split("\n")
    bad = {p.line for p in problems}
    assert all(1 <= line <= len(lines) for line in bad)
    assert len(rows) + len(bad) == sum(1 for line in lines if line.split())
    cls = rows[:, 0]
    assert ((cls >= 0) & (cls < nc) & (cls == np.floor(cls))).all()
    assert ((rows[:, 1:] >= 0) & (rows[:, 1:] <= 1)).all()
    assert (rows[:, 3] > rows[:, 1]).all() and (rows[:, 4] > rows[:, 2]).all()


@settings(FAST, max_examples=300)
@given(text=label_texts, nc=st.integers(1, 5))
def test_structured_label_lines(text, nc):
    check_parse(text, nc, *parse_label_text(text, SOURCE, nc))


@settings(FAST, max_examples=500)
@given(text=st.text(max_size=60), nc=st.integers(1, 5))
def test_arbitrary_label_text(text, nc):
    check_parse(text, nc, *parse_label_text(text, SOURCE, nc))


@settings(FAST, max_examples=500)
@given(data=st.binary(max_size=80), nc=st.integers(1, 5))
def test_arbitrary_label_bytes(data, nc):
    rows, problems = parse_label_bytes(data, SOURCE, nc)
    assert rows.shape[1] == 5 and np.isfinite(rows).all()
    assert all(p.file == SOURCE for p in problems)


DELETE = object()  # a mutation that removes the key or list item


def _paths(value, prefix: tuple = ()) -> list[tuple]:
    """Every position in a JSON value (the root included)."""
    out = [prefix]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        out += _paths(child, prefix + (key,))
    return out


def _mutate(value, path: tuple, new):
    """A copy of ``value`` with the node at ``path`` replaced by ``new`` (or removed)."""
    if not path:
        return None if new is DELETE else new
    out = copy.copy(value)
    key, rest = path[0], path[1:]
    if rest or new is not DELETE:
        out[key] = _mutate(value[key], rest, new)
    else:
        del out[key]
    return out


@st.composite
def coco_like(draw) -> dict:
    """A valid COCO dict with up to three nodes replaced by arbitrary JSON or removed."""
    n_images, n_cats = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    box = st.tuples(st.floats(0, 20), st.floats(0, 20), st.floats(0.5, 10), st.floats(0.5, 10)).map(list)
    annotations = [
        {"id": j + 1, "image_id": draw(st.integers(1, n_images)), "category_id": draw(st.integers(1, n_cats)),
         "bbox": draw(box), "iscrowd": draw(st.sampled_from([0, 0, 0, 1]))}
        for j in range(draw(st.integers(0, 5)))
    ]
    value = {
        "images": [{"id": i + 1, "file_name": f"im {i}.jpg", "width": 32, "height": 32} for i in range(n_images)],
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": f"c{k}"} for k in range(n_cats)],
    }
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(value)))
        value = _mutate(value, path, draw(st.just(DELETE) | json_values))
    return value


def check_coco(value) -> None:
    """Only SlimloopError may escape; records hold consistent, valid boxes."""
    try:
        parse = coco_to_split(value, "train.json")
    except SlimloopError:
        return
    for record in parse.records:
        assert len(record.boxes) == len(record.labels) == len(record.box_prefixes)
        assert all(0 <= label < len(parse.categories) for label in record.labels)
        for x1, y1, x2, y2 in record.boxes:
            assert all(math.isfinite(v) for v in (x1, y1, x2, y2)) and x2 > x1 and y2 > y1
    everything = parse.fatal + parse.dropped + [p for r in parse.records for p in r.problems]
    assert all(isinstance(p, Problem) and p.file == "train.json" for p in everything)
    assert parse.ignored_crowd >= 0


@settings(FAST, max_examples=400)
@given(value=json_values)
def test_coco_arbitrary_json(value):
    check_coco(value)


@settings(FAST, max_examples=600)
@given(value=coco_like())
def test_coco_like_structures(value):
    check_coco(value)
