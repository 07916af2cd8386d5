"""params.yaml validation: bad values stop with the key, its line and the allowed values."""

from pathlib import Path

import pytest
import yaml

from slimloop.config import Params, load_params
from slimloop.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["params.yaml", "profiles/gpu.yaml", "profiles/gpu-smoke.yaml"])
def test_repo_params_are_valid(name):
    params = load_params(ROOT / name)
    assert isinstance(params, Params)
    assert params.train.imgsz % 32 == 0


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """``section.key.subkey -> value`` for every leaf of a nested dict."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_built_in_defaults_are_the_committed_params_yaml():
    """One source of truth: every key of params.yaml equals the pydantic default, and every default
    is written in params.yaml (the optional data.yolo / data.coco sources excepted: null by default)."""
    from slimloop.config import params_to_dict

    defaults = _leaves(params_to_dict(Params()))
    written = _leaves(params_to_dict(load_params(ROOT / "params.yaml")))
    raw = _leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
    optional = {k for k, v in defaults.items() if v is None and k in ("data.yolo", "data.coco")}
    assert set(raw) == set(defaults) - optional, "keys in params.yaml and in config.py differ"
    differ = {k: (written[k], defaults[k]) for k in defaults if written[k] != defaults[k]}
    assert differ == {}, f"params.yaml value vs default: {differ}"
    assert len(defaults) > 90  # every key compared, not a few


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "lr0", -1, "train.lr0: Input should be greater than 0"),
        ("train", "schedule", "cos", "'cosine' or 'linear'"),
        ("train", "imgsz", 250, "multiple of the model stride 32"),
        ("train", "device", "tpu", "auto, cpu, mps, cuda, cuda:N"),
        ("data", "source", "kaggle", "'synthetic', 'yolo' or 'coco'"),
        ("eval", "imgsz_sweep", [256, 100], "eval.imgsz_sweep.1"),
        ("model", "base", "x", "'n', 's' or 'm'"),
    ],
)
def test_bad_value_names_key(tmp_path, section, key, value, expected):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw[section][key] = value
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, raw))
    assert expected in str(err.value)


def test_unknown_key_lists_allowed_and_line(tmp_path):
    text = "train:\n  epochs: 3\n  lr: 0.1\n"
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert f"{path}:3: train.lr: unknown key" in msg
    assert "lr0" in msg and "epochs" in msg


def test_unknown_section(tmp_path):
    path = write(tmp_path, {"trian": {"epochs": 3}})
    with pytest.raises(ConfigError, match="trian: unknown key; allowed keys: data, model"):
        load_params(path)


def test_source_needs_its_section(tmp_path):
    path = write(tmp_path, {"data": {"source": "yolo"}})
    with pytest.raises(ConfigError, match="data.yolo is missing"):
        load_params(path)


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_params(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "---\n", "~\n"])
def test_empty_or_comments_only_file_is_refused(tmp_path, text):
    """An empty params file would run on built-in values nobody chose: refused, naming the file."""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}: the params file is empty \(or only comments\)"):
        load_params(path)


def test_duplicate_key_names_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n  imgsz: 128\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=rf"{path}:4: not valid YAML: duplicate key 'epochs' "
                                          r"\(first at line 2, again at line 4\)"):
        load_params(path)
    path.write_text("train: {epochs: 3}\ntrain: {epochs: 4}\n")  # a whole section twice
    with pytest.raises(ConfigError, match=r"duplicate key 'train' \(first at line 1, again at line 2\)"):
        load_params(path)
    from slimloop.yamlfile import parse_yaml

    # a merge key may still override what it brings in
    assert parse_yaml("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n") == {"a": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}}


def test_yaml_syntax_error_is_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    lines = ["train:", "  epochs: 3", "  imgsz: 128", "eval:", "  conf_thres: 0.001", "  nms_iou 0.6", "  max_det: 3"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert message == (f"{path}:7: not valid YAML: could not find expected ':' "
                       "(while scanning a simple key at line 6)"), message
    assert "<unicode string>" not in message


def test_deep_nesting_is_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: " + "[" * 50000 + "]" * 50000 + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:1: not valid YAML: nested deeper than 100 levels"):
        load_params(path)


def test_bare_off_is_the_off_choice_and_not_a_bool(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("distill:\n  mode: off\ncompress:\n  final_retrain: off\n")
    params = load_params(path)
    assert params.distill.mode == "off" and params.compress.final_retrain == "off"
    path.write_text("distill:\n  mode: on\n")  # true is no choice
    with pytest.raises(ConfigError, match="distill.mode"):
        load_params(path)
