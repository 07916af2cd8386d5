"""YAML files validated by pydantic models (params.yaml, deploy.yaml, spec files): reading them,
and errors as ``file:line: key.path: message`` with the allowed keys for unknown ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from slimloop.errors import ConfigError
from slimloop.io import read_text_file

M = TypeVar("M", bound=BaseModel)


def _key_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at ``loc`` in ``text``, or of its deepest existing parent."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            line = match[0][0].start_mark.line + 1
            node = match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    """One human line for a pydantic error, with allowed keys for unknown ones."""
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        owner: Any = model
        for key in err["loc"][:-1]:
            field = owner.model_fields.get(str(key)) if isinstance(owner, type) else None
            owner = field.annotation if field is not None else None
        if isinstance(owner, type) and issubclass(owner, BaseModel):
            msg = f"unknown key; allowed keys: {', '.join(owner.model_fields)}"
        else:
            msg = "unknown key"
    elif "input" in err and err["type"] not in ("missing", "value_error"):
        msg = f"{msg} (got {err['input']!r})"
    return msg


def format_validation_error(
    exc: ValidationError, source: str, text: str | None, model: type[BaseModel], prefix: tuple = (),
    title: str = "params",
) -> str:
    """Render a pydantic error as ``invalid <title>:`` and ``file:line: key.path: message`` lines."""
    lines = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        line = _key_line(text, loc) if text else None
        where = f"{source}:{line}" if line else source
        key = ".".join(str(k) for k in loc) or "<root>"
        lines.append(f"{where}: {key}: {_describe(err, model)}")
    return f"invalid {title}:\n  " + "\n  ".join(lines)


def read_yaml_mapping(path: Path, what: str) -> tuple[str, dict[str, Any]]:
    """The text of the YAML file ``path`` and its top-level mapping; ``what`` names it in errors.

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8, not YAML, or not a mapping.
    """
    text = read_text_file(path, what, ConfigError)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping, got {type(raw).__name__}")
    return text, raw


def load_yaml_model(path: str | Path, model: type[M], what: str, title: str) -> M:
    """Read the YAML file ``path`` and validate it as ``model``; ``what`` and ``title`` name the
    file in errors (``cannot read <what>``, ``invalid <title>:``).

    Raises:
        ConfigError: the file is missing, not YAML, or a key is unknown or out of range.
    """
    path = Path(path)
    text, raw = read_yaml_mapping(path, what)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), text, model, title=title)) from None
