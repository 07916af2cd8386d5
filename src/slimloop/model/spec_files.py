"""Spec files: save and load a ModelSpec as JSON or YAML, with file:line in errors."""

from __future__ import annotations

from pathlib import Path

from slimloop.io import parse_json, read_text_file, write_text_atomic
from slimloop.model.spec import ModelSpec, SpecError, spec_to_json, spec_to_yaml
from slimloop.yamlfile import _key_line, load_yaml_text  # _key_line: shared with params.yaml


def _format(path: Path) -> str:
    fmt = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}.get(path.suffix.lower())
    if fmt is None:
        raise SpecError(f"{path}: unknown spec file extension {path.suffix!r}; use .json, .yaml or .yml")
    return fmt


def save_spec(spec: ModelSpec, path: str | Path) -> Path:
    """Write ``spec`` atomically as JSON or YAML, chosen by the extension; return the path."""
    path = Path(path)
    text = spec_to_json(spec) + "\n" if _format(path) == "json" else spec_to_yaml(spec)
    write_text_atomic(path, text)
    return path


def load_spec(path: str | Path) -> ModelSpec:
    """Read a spec file written by ``save_spec`` (or by hand).

    Raises:
        SpecError: unreadable file, unknown extension, not JSON/YAML, a key given twice, nested too
            deeply, or an invalid spec (too large included); the message starts with ``file:line``
            where the line is known.
    """
    path = Path(path)
    fmt = _format(path)
    text = read_text_file(path, "spec file", SpecError)
    data = parse_json(text, str(path), SpecError) if fmt == "json" else load_yaml_text(text, str(path), SpecError)
    try:
        return ModelSpec.from_dict(data)
    except SpecError as exc:
        line = _key_line(text, exc.loc) if fmt == "yaml" and exc.loc else None
        where = f"{path}:{line}" if line else str(path)
        raise SpecError(f"{where}: {exc}", exc.loc) from None
