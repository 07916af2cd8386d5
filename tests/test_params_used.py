"""Every key of params.yaml is read by code other than its own validation: no param without an effect."""

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "src" / "slimloop" / "config.py"


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out += _leaves(value, path + ".") if isinstance(value, dict) and value else [path]
    return out


def _reads() -> tuple[set[str], set[str]]:
    """Attribute names read (``x.name``) and string constants (``d["name"]``, ``getattr(x, "name")``)
    in src/ and flows/, config.py (where params are declared and cross-checked) left out."""
    attrs, strings = set(), set()
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "flows").rglob("*.py")]:
        if path == CONFIG:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                attrs.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    return attrs, strings


def test_every_params_key_is_read_outside_its_declaration():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    attrs, strings = _reads()
    unread = [leaf for leaf in _leaves(params)
              if leaf.rsplit(".", 1)[-1] not in attrs | strings and leaf not in strings]
    assert unread == [], f"params.yaml keys no code reads: {unread}"


def test_the_check_finds_a_key_nothing_reads():
    attrs, strings = _reads()
    assert "no_such_knob_anywhere" not in attrs | strings
    assert _leaves({"a": {"b": 1, "c": {"no_such_knob_anywhere": 2}}}) == ["a.b", "a.c.no_such_knob_anywhere"]
