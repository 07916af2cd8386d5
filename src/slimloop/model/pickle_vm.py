"""A pickle machine that runs nothing it was not given: opcodes parsed by pickletools, executed here.

``pickle.load`` calls whatever global a file names. :class:`Machine` executes the opcodes of a
pickle itself (:func:`pickletools.genops` only parses) and asks a ``resolve(module, name)``
function what each global becomes: an allowlisted :class:`Call`, a value, a stand-in class, or a
refusal. REDUCE and NEWOBJ call only :class:`Call` objects and stand-in classes; BUILD sets state
only on stand-ins. ``slimloop.model.torch_zip`` holds the allowlist for torch checkpoints.
"""

from __future__ import annotations

import pickletools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ModuleStandIn:
    """A pickled ``nn.Module`` (or YOLOv5 module), inert: its class name and its ``__dict__``.

    ``kind`` is the qualified class name (``models.common.Conv``); ``state`` what the pickle
    stored (``_modules``, ``_parameters``, ``_buffers``, ``f``, ``i``, ``yaml``, ...).
    """

    kind = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.state = args, {}

    @property
    def name(self) -> str:
        """The class name without its module (``Conv``)."""
        return self.kind.rsplit(".", 1)[-1]

    def get(self, key: str, default: Any = None) -> Any:
        """A pickled attribute."""
        return self.state.get(key, default)

    def children(self) -> dict[str, Any]:
        """Sub-modules by name (``None`` entries kept, as torch keeps them)."""
        return dict(self.state.get("_modules") or {})

    def __repr__(self) -> str:
        return f"<stand-in {self.kind}>"


class Opaque(ModuleStandIn):
    """A metadata value of a type that is not rebuilt (a numpy array, a path): kept as its arguments."""


@dataclass(frozen=True)
class Call:
    """An allowlisted callable: what REDUCE may call."""

    name: str
    fn: Callable[..., Any]


class Marker:
    """A global that is a value, never called (``builtins.object`` for ``copyreg._reconstructor``)."""

    def __init__(self, name: str):
        self.name = name


def stand_in_class(qualname: str, base: type[ModuleStandIn], cache: dict[str, type]) -> type:
    """A subclass of ``base`` named like the pickled class (one per ``qualname`` in ``cache``)."""
    if qualname not in cache:
        cache[qualname] = type(qualname.rsplit(".", 1)[-1], (base,), {"kind": qualname})
    return cache[qualname]


class Machine:
    """Executes the opcodes of one pickle; ``resolve`` decides what each global is."""

    def __init__(self, resolve: Callable[[str, str], Any], persistent_load: Callable[[Any], Any]):
        self.resolve, self.persistent_load = resolve, persistent_load
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        return self.resolve(module, name)

    def pop_mark(self) -> list[Any]:
        items, self.stack = self.stack, self.marks.pop()
        return items

    def call(self, fn: Any, args: Any, kwargs: Any = None) -> Any:
        if not isinstance(args, tuple):
            raise ValueError("call arguments must be a tuple")
        if isinstance(fn, Call):
            return fn.fn(*args, **(kwargs or {}))
        if isinstance(fn, type) and issubclass(fn, ModuleStandIn):
            return fn(*args, **(kwargs or {}))
        raise ValueError(f"the pickle calls {fn!r}, which is not an allowed callable")

    def build(self, state: Any) -> None:
        obj = self.stack[-1]
        if not isinstance(obj, ModuleStandIn):
            raise ValueError(f"the pickle sets the state of a {type(obj).__name__}, which is not a model class")
        if isinstance(obj, Opaque):
            obj.state = {"__state__": state}
            return
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise ValueError(f"a module's state must be a dict, got {type(state).__name__}")
        obj.state.update(state)

    def run(self, data: bytes) -> Any:
        for op, arg, _ in pickletools.genops(data):
            handler = _HANDLERS.get(op.name)
            if handler is None:
                raise ValueError(f"pickle opcode {op.name} is not supported")
            if handler is _stop:
                return self.stack.pop()
            handler(self, arg)
        raise ValueError("the pickle has no STOP")


def _stop(m: Machine, arg: Any) -> None:  # handled in run()
    pass


def _push(m: Machine, arg: Any) -> None:
    m.stack.append(arg)


def _const(value: Any) -> Callable[[Machine, Any], None]:
    return lambda m, arg: m.stack.append(value() if callable(value) else value)


def _global(m: Machine, arg: str) -> None:
    module, name = arg.split(" ", 1)
    m.stack.append(m.find_class(module, name))


def _stack_global(m: Machine, arg: Any) -> None:
    name, module = m.stack.pop(), m.stack.pop()
    if not isinstance(name, str) or not isinstance(module, str):
        raise ValueError("STACK_GLOBAL needs two strings")
    m.stack.append(m.find_class(module, name))


def _inst(m: Machine, arg: str) -> None:
    m.find_class(*arg.split(" ", 1))  # refuses a disallowed class by name
    raise ValueError("pickle opcode INST (protocol 0 instances) is not supported")


def _setitems(m: Machine, arg: Any) -> None:
    items = m.pop_mark()
    target = m.stack[-1]
    if not isinstance(target, dict):
        raise ValueError("SETITEMS on a non-dict")
    for k in range(0, len(items) - 1, 2):
        target[items[k]] = items[k + 1]


def _setitem(m: Machine, arg: Any) -> None:
    value, key = m.stack.pop(), m.stack.pop()
    if not isinstance(m.stack[-1], dict):
        raise ValueError("SETITEM on a non-dict")
    m.stack[-1][key] = value


def _appends(m: Machine, arg: Any) -> None:
    items = m.pop_mark()
    if not isinstance(m.stack[-1], list):
        raise ValueError("APPENDS on a non-list")
    m.stack[-1].extend(items)


def _append(m: Machine, arg: Any) -> None:
    value = m.stack.pop()
    if not isinstance(m.stack[-1], list):
        raise ValueError("APPEND on a non-list")
    m.stack[-1].append(value)


def _additems(m: Machine, arg: Any) -> None:
    items = m.pop_mark()
    if not isinstance(m.stack[-1], set):
        raise ValueError("ADDITEMS on a non-set")
    m.stack[-1].update(items)


def _tuple_n(n: int) -> Callable[[Machine, Any], None]:
    def make(m: Machine, arg: Any) -> None:
        items = m.stack[len(m.stack) - n:] if n else []
        del m.stack[len(m.stack) - n:]
        m.stack.append(tuple(items))
    return make


def _from_mark(make: Callable[[list[Any]], Any]) -> Callable[[Machine, Any], None]:
    def build(m: Machine, arg: Any) -> None:
        items = m.pop_mark()  # replaces m.stack: append only afterwards
        m.stack.append(make(items))
    return build


def _reduce(m: Machine, arg: Any) -> None:
    args = m.stack.pop()
    m.stack[-1] = m.call(m.stack[-1], args)


def _newobj(m: Machine, arg: Any) -> None:
    args = m.stack.pop()
    m.stack[-1] = m.call(m.stack[-1], args)


def _newobj_ex(m: Machine, arg: Any) -> None:
    kwargs, args = m.stack.pop(), m.stack.pop()
    m.stack[-1] = m.call(m.stack[-1], args, kwargs if isinstance(kwargs, dict) else None)


def _put(m: Machine, arg: int) -> None:
    m.memo[arg] = m.stack[-1]


def _memoize(m: Machine, arg: Any) -> None:
    m.memo[len(m.memo)] = m.stack[-1]


def _get(m: Machine, arg: int) -> None:
    m.stack.append(m.memo[arg])


def _mark(m: Machine, arg: Any) -> None:
    m.marks.append(m.stack)
    m.stack = []


def _pop(m: Machine, arg: Any) -> None:
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()


_HANDLERS: dict[str, Callable[[Machine, Any], None]] = {
    "PROTO": lambda m, a: None, "FRAME": lambda m, a: None, "STOP": _stop,
    "MARK": _mark, "POP": _pop, "POP_MARK": lambda m, a: m.pop_mark(),
    "DUP": lambda m, a: m.stack.append(m.stack[-1]),
    **{name: _push for name in (
        "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
        "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
        "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8")},
    "NONE": _const(None), "NEWTRUE": _const(True), "NEWFALSE": _const(False),
    "EMPTY_LIST": _const(list), "EMPTY_DICT": _const(dict), "EMPTY_SET": _const(set),
    "EMPTY_TUPLE": _tuple_n(0), "TUPLE1": _tuple_n(1), "TUPLE2": _tuple_n(2), "TUPLE3": _tuple_n(3),
    "TUPLE": _from_mark(tuple), "LIST": _from_mark(list), "FROZENSET": _from_mark(frozenset),
    "DICT": _from_mark(lambda items: dict(zip(items[::2], items[1::2], strict=True))),
    "APPEND": _append, "APPENDS": _appends, "SETITEM": _setitem, "SETITEMS": _setitems,
    "ADDITEMS": _additems,
    "GLOBAL": _global, "STACK_GLOBAL": _stack_global, "INST": _inst,
    "REDUCE": _reduce, "NEWOBJ": _newobj, "NEWOBJ_EX": _newobj_ex,
    "BUILD": lambda m, a: m.build(m.stack.pop()),
    "PUT": _put, "BINPUT": _put, "LONG_BINPUT": _put, "MEMOIZE": _memoize,
    "GET": _get, "BINGET": _get, "LONG_BINGET": _get,
    "PERSID": lambda m, a: m.stack.append(m.persistent_load(a)),
    "BINPERSID": lambda m, a: m.stack.append(m.persistent_load(m.stack.pop())),
}
