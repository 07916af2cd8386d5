"""YAML files validated by pydantic models (params.yaml, deploy.yaml, spec files): reading them,
and errors as ``file:line: key.path: message`` with the allowed keys for unknown ones."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from slimloop.errors import ConfigError
from slimloop.io import MAX_DEPTH, read_text_file

M = TypeVar("M", bound=BaseModel)
_MERGE = "tag:yaml.org,2002:merge"


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently) and nesting deeper than :data:`slimloop.io.MAX_DEPTH` (PyYAML's composer recurses:
    deep nesting would end in ``RecursionError``). Merge keys (``<<: *base``) still override."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        first: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {str(key)[:60]!r} (first at line {first[key]}, again at line {line})",
                    key_node.start_mark)
            first[key] = line
        return super().construct_mapping(node, deep)


def yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """The 1-based line and the message of a YAML error, without PyYAML's ``<unicode string>`` marks."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None)
    if problem is None:
        return None, str(exc)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        problem += f" ({context} at line {context_mark.line + 1})"
    return (mark.line + 1 if mark is not None else None), problem


def parse_yaml(text: str) -> Any:
    """``text`` parsed with :class:`StrictSafeLoader`.

    Raises:
        yaml.YAMLError: not YAML, a duplicate key, or nested too deeply (see :func:`yaml_problem`).
    """
    try:
        return yaml.load(text, Loader=StrictSafeLoader)  # a SafeLoader: no Python objects are built
    except RecursionError:  # not reached with the depth bound; kept so that no traceback is possible
        raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels") from None


def load_yaml_text(text: str, source: str, error: type[Exception] = ConfigError) -> Any:
    """:func:`parse_yaml`, with failures as ``error``: ``<source>:<line>: not valid YAML: <problem>``."""
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        line, problem = yaml_problem(exc)
        where = f"{source}:{line}" if line else source
        raise error(f"{where}: not valid YAML: {problem}") from None


def _key_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at ``loc`` in ``text``, or of its deepest existing parent."""
    try:
        node = yaml.compose(text, Loader=StrictSafeLoader)
    except (yaml.YAMLError, RecursionError):
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
        msg = f"{msg} (got {reprlib.repr(err['input'])})"
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
        ConfigError: the file is missing, unreadable, not UTF-8, not YAML (with its line), holds a
            key twice, is empty or only comments, or is not a mapping.
    """
    text = read_text_file(path, what, ConfigError)
    raw = load_yaml_text(text, str(path))
    if raw is None:  # empty or only comments: running on built-in values the user never chose is a mistake
        raise ConfigError(f"{path}: the {what} is empty (or only comments); write the keys to use "
                          "(the committed params.yaml lists every one)")
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
