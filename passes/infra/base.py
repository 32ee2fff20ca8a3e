"""The pass contract and the registry.

A pass is a class with:

- ``name``: what pipelines call it (``fold-bn``);
- ``level``: the IR level it runs on (``torch``, ``onnx`` or ``tvm``);
- ``Options``: a dataclass of typed options with defaults (``int``, ``float``, ``bool``, ``str``,
  ``tuple[int, ...]``, ``tuple[float, ...]``, ``typing.Literal[...]`` for a choice), each declared
  with :func:`option`, which documents it and declares its bounds (``ge``/``gt``/``le``/``lt``;
  ``nonempty`` for lists). The bounds are checked here, for every pass alike, and printed by
  ``--list-passes``; an optional ``validate()`` method checks only what no bound can say (relations
  between options, the form of a string);
- ``requires`` / ``provides`` / ``invalidates``: facts (strings) about the program;
- ``refuses``: facts that must not hold when the pass runs (it cannot work on such a program,
  e.g. a float-only rewrite after a quantiser), each with its one-line fix (empty: put this pass
  before the one that made the fact); the pipeline is then refused before anything runs, naming
  the pass that established the fact and the fix. ``refused_facts()`` may narrow them by option;
- ``check_tolerance``: the largest allowed change of the outputs, relative to their magnitude
  (``max|new - old| <= tol * max(1, max|old|)``), or ``None`` for passes that trade accuracy
  for cost (their change is reported, not enforced);
- ``run(program, ctx) -> Program``: the rewrite. It must not modify its input program.

Register a pass once with :func:`register`; the registry is what pipelines parse against and what
``tools/compile.py --list-passes`` prints.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, Literal

from ...ir.errors import OptionValueError, UnknownOptionError, UnknownPassError
from ...ir.program import LEVELS, Program


#: the bound keywords of :func:`option`
BOUNDS = ("ge", "gt", "le", "lt")


def option(default, doc: str, *, ge=None, gt=None, le=None, lt=None, nonempty: bool = False, why: str = ""):
    """A declared option: its default, its documentation and its bounds.

    ``ge``/``gt``/``le``/``lt`` bound a number, or every item of a list option; ``nonempty`` asks a
    list option for at least one item; ``why`` is appended to the error a violated bound gives
    (e.g. ``"the thresholds are learned"``)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, metadata={"doc": doc, "bounds": bounds, "nonempty": nonempty, "why": why})


@dataclasses.dataclass
class NoOptions:
    """A pass without options."""


class Pass:
    name: ClassVar[str] = ""
    level: ClassVar[str] = "torch"
    summary: ClassVar[str] = ""
    requires: ClassVar[tuple] = ()
    provides: ClassVar[tuple] = ()
    invalidates: ClassVar[tuple] = ()
    #: facts this pass cannot run after: fact -> the one-line fix (the order or option that
    #: works; empty: "put this pass before the one that made the fact"); see :meth:`refused_facts`
    refuses: ClassVar[dict] = {}
    check_tolerance: ClassVar[float | None] = None
    Options: ClassVar[type] = NoOptions

    def __init__(self, **options: Any) -> None:
        self.options, self.explicit = build_options(self, options)

    def run(self, program: Program, ctx) -> Program:  # pragma: no cover - the contract
        raise NotImplementedError

    def refused_facts(self) -> dict:
        """The facts this pass, with its options, refuses to follow (default: ``refuses``)."""
        return dict(self.refuses)

    def text(self) -> str:
        """This pass as pipeline text; only options given explicitly are printed."""
        if not self.explicit:
            return self.name
        parts = []
        for f in dataclasses.fields(self.options):
            if f.name in self.explicit:
                parts.append(f"{f.name}={format_value(getattr(self.options, f.name))}")
        return f"{self.name}{{{' '.join(parts)}}}"

    def __repr__(self) -> str:
        return f"<pass {self.text()}>"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.options == other.options

    def __hash__(self) -> int:
        return hash(self.text())


# -- registry ---------------------------------------------------------------------------------
_REGISTRY: dict = {}


def register(cls: type) -> type:
    """Class decorator: add a pass to the registry (once)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass {cls.name!r} is registered twice")
    if cls.level not in LEVELS:
        raise TypeError(f"pass {cls.name!r} has unknown level {cls.level!r}")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownPassError(
            f"unknown pass {name!r}; {hint}known passes: {', '.join(sorted(_REGISTRY))} (--list-passes)"
        ) from None


def registered() -> dict:
    """name -> pass class, sorted by name."""
    return dict(sorted(_REGISTRY.items()))


def providers_of(fact: str) -> list:
    return sorted(name for name, cls in _REGISTRY.items() if fact in cls.provides)


# -- options ----------------------------------------------------------------------------------
def build_options(p: Pass, given: dict):
    cls = p.Options
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, raw in given.items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise UnknownOptionError(f"pass {p.name!r} has no option {key!r}; its options: {valid}")
        values[key] = coerce(p.name, key, hints[key], raw)
    try:
        options = cls(**values)
    except TypeError as e:
        raise OptionValueError(f"pass {p.name!r}: {e}") from None
    for f in dataclasses.fields(cls):
        problem = bound_violation(f, hints[f.name], getattr(options, f.name))
        if problem:
            raise OptionValueError(f"pass {p.name!r}: {problem}")
    check = getattr(options, "validate", None)
    if check is not None:
        try:
            check()
        except (ValueError, TypeError) as e:
            raise OptionValueError(f"pass {p.name!r}: {e}") from None
    return options, frozenset(values)


def _number(value) -> str:
    return format_value(value) if not isinstance(value, float) or not value.is_integer() else str(int(value))


def describe_bounds(bounds: dict, integer: bool) -> str:
    """``(0, 1]``, ``0..16``, ``>= 1``: the range the bounds allow, as the errors and
    ``--list-passes`` print it."""
    low = ("gt", bounds["gt"]) if "gt" in bounds else ("ge", bounds["ge"]) if "ge" in bounds else None
    high = ("lt", bounds["lt"]) if "lt" in bounds else ("le", bounds["le"]) if "le" in bounds else None
    if low and high:
        if integer and low[0] == "ge" and high[0] == "le":
            return f"{_number(low[1])}..{_number(high[1])}"
        return f"{'(' if low[0] == 'gt' else '['}{_number(low[1])}, {_number(high[1])}{')' if high[0] == 'lt' else ']'}"
    kind, value = low or high
    return {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[kind] + f" {_number(value)}"


def _within(value, bounds: dict) -> bool:
    return (
        ("gt" not in bounds or value > bounds["gt"])
        and ("ge" not in bounds or value >= bounds["ge"])
        and ("lt" not in bounds or value < bounds["lt"])
        and ("le" not in bounds or value <= bounds["le"])
    )


def bound_violation(f: dataclasses.Field, tp, value) -> str:
    """The one-line problem with ``value`` against the bounds ``f`` declares, or ``""``."""
    bounds, nonempty = f.metadata.get("bounds", {}), f.metadata.get("nonempty", False)
    why = f" ({f.metadata['why']})" if f.metadata.get("why") else ""
    if value is None or not (bounds or nonempty):
        return ""
    text = f"{f.name}={format_value(value)}"
    if isinstance(value, tuple):
        integer = typing.get_args(tp)[0] is int if typing.get_args(tp) else False
        if nonempty and not value:
            return f"{f.name} is empty; give at least one value{why}"
        if not all(_within(v, bounds) for v in value):
            what = "integers" if integer else "numbers"
            if bounds == {"gt": 0}:
                return f"{text} must be a {'non-empty ' if nonempty else ''}list of positive {what}{why}"
            where = describe_bounds(bounds, integer)
            where = f"in {where}" if len(bounds) > 1 else where
            return f"{text} must be a {'non-empty ' if nonempty else ''}list of {what} {where}{why}"
        return ""
    if _within(value, bounds):
        return ""
    range_text = describe_bounds(bounds, isinstance(value, int))
    verb = "must lie in" if len(bounds) > 1 else "must be"
    return f"{text} {verb} {range_text}{why}"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a comma-separated list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _choices(tp) -> str:
    """``static or adaptive``: the choices of a Literal option in prose."""
    names = [format_value(a) for a in typing.get_args(tp)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def coerce(pass_name: str, key: str, tp, raw):
    """Convert ``raw`` (pipeline text or a Python value) to the option's declared type."""

    def bad(why: str = ""):
        return OptionValueError(
            f"pass {pass_name!r}: option {key}={format_value(raw)} is not {_type_name(tp)}{why}"
        )

    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() == "none"):
            return None
        return coerce(pass_name, key, args[0], raw)
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if raw == c or (isinstance(raw, str) and raw == str(c)):
                return c
        raise bad(f" (choose {_choices(tp)})")
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(raw, str):
            items = [s for s in raw.split(",") if s != ""]
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            items = [raw]
        return tuple(coerce(pass_name, key, item, x) for x in items)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
            return False
        raise bad()
    if tp is int:
        if isinstance(raw, bool):
            raise bad()
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw), 10)
        except ValueError:
            raise bad() from None
    if tp is float:
        if isinstance(raw, bool):
            raise bad()
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise bad() from None
    if tp is str:
        return str(raw)
    raise TypeError(f"option {key} of pass {pass_name!r} has unsupported type {tp}")


def format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def option_docs(cls: type) -> list:
    """(name, type text, default text, doc) for each option of a pass class."""
    hints = typing.get_type_hints(cls.Options)
    rows = []
    for f in dataclasses.fields(cls.Options):
        if f.default is not dataclasses.MISSING:
            default = format_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = format_value(f.default_factory())
        else:
            default = "(required)"
        type_text = _type_name(hints[f.name])
        bounds = f.metadata.get("bounds")
        if bounds:
            integer = hints[f.name] is int or typing.get_args(hints[f.name])[:1] == (int,)
            type_text += f" in {describe_bounds(bounds, integer)}" if len(bounds) > 1 else f" {describe_bounds(bounds, integer)}"
        if f.metadata.get("nonempty"):
            type_text = "a non-empty " + type_text.removeprefix("a ")
        rows.append((f.name, type_text, default or "(none)", f.metadata.get("doc", "")))
    return rows
