"""Typed method options: a method's options are the keyword arguments of its constructor.

Every :class:`medlens.Method` subclass is turned into a keyword-only dataclass (see
:func:`typed_options`), so ``GradCAM(top_k_channels=32)`` has a real signature, with types and
defaults that ``medlens methods`` lists. Names are checked when the method is built: a misspelt
option is a :class:`MedlensError` naming the valid ones, with a "did you mean". Range checks live
in each method's ``validate``; helpers here convert the CLI's ``key=value`` strings to the
annotated types.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import types
import typing
from typing import Any, Callable, Iterable, Sequence

from medlens.errors import MedlensError


def typed_options(cls: type) -> type:
    """Make ``cls`` a keyword-only dataclass (its annotated class attributes are its options)
    whose constructor refuses unknown option names with a one-line :class:`MedlensError`."""
    dataclasses.dataclass(kw_only=True, eq=False)(cls)
    init = cls.__init__

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **options: Any) -> None:
        if args:
            raise MedlensError(f"{_label(cls)} takes its options as keywords, e.g. {_example(cls)}")
        check_names(cls, options)
        init(self, **options)

    cls.__init__ = checked_init  # type: ignore[method-assign]
    return cls


def _label(cls: type) -> str:
    return getattr(cls, "name", "") or cls.__name__


def _example(cls: type) -> str:
    names = option_names(cls)
    return f"{names[0]}=..." if names else "(it takes no options)"


def option_names(cls: type) -> list[str]:
    """The option names of a method class, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []


def check_names(cls: type, options: Iterable[str]) -> None:
    """Raise MedlensError for the first option name ``cls`` does not take, naming the valid ones."""
    valid = option_names(cls)
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listed = ", ".join(valid) if valid else "none"
            raise MedlensError(f"{_label(cls)} has no option {key!r}{hint} (options: {listed})")


def option_types(cls: type) -> dict[str, Any]:
    """Option name -> resolved annotation."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve (e.g. a class defined in a function)
        hints = {}
    return {name: hints.get(name, Any) for name in option_names(cls)}


def option_defaults(cls: type) -> dict[str, Any]:
    """Option name -> default value (``dataclasses.MISSING`` for a required one)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.init:
            out[f.name] = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
    return out


def type_name(annotation: Any) -> str:
    """A short readable name for an annotation: ``int | float | None``, ``tuple[int, ...]``."""
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("torch.", "")


# --- checks shared by the methods' ``validate`` ------------------------------------------------------
def require(condition: bool, method: str, option: str, value: Any, rule: str) -> None:
    """Raise ``MedlensError("<method>: option <option>=<value> <rule>")`` unless ``condition``."""
    if not condition:
        raise MedlensError(f"{method}: option {option}={value!r} {rule}")


def check_choice(method: str, option: str, value: Any, choices: Sequence[Any]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MedlensError(f"{method}: option {option}={value!r} unknown; use {', '.join(map(str, choices))}{hint}")


def check_top_k(method: str, value: int | float | None, option: str = "top_k_channels") -> None:
    """A channel count (int >= 0, 0 = all) or a fraction in (0, 1), or None."""
    if value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (
        (float(value).is_integer() and value >= 0) or 0 < value < 1)
    require(ok, method, option, value, "must be a channel count >= 0 or a fraction in (0, 1)")


def check_types(obj: Any) -> None:
    """Refuse option values whose type contradicts the annotation (for plain scalar types only:
    a ``str`` where an ``int`` is expected, a float where a bool is expected, ...)."""
    for name, annotation in option_types(type(obj)).items():
        value = getattr(obj, name)
        allowed = _plain_types(annotation)
        if allowed is None or _accepts(value, allowed):
            continue
        raise MedlensError(f"{_label(type(obj))}: option {name}={value!r} must be {type_name(annotation)}")


def _plain_types(annotation: Any) -> tuple[type, ...] | None:
    """The runtime types an annotation made of int/float/bool/str/None/tuple allows, or None
    when it involves anything else (tensors, callables: not checked)."""
    args = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    out = []
    for arg in args:
        origin = typing.get_origin(arg) or arg
        if origin in (int, float, bool, str, tuple, list, type(None)):
            out.append(origin)
        else:
            return None
    return tuple(out)


def _accepts(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    if isinstance(value, (tuple, list)) and (tuple in allowed or list in allowed):
        return True
    return isinstance(value, allowed)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


# --- CLI strings --------------------------------------------------------------------------------
_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null", "")


def convert(text: str, annotation: Any) -> Any:
    """Convert a CLI string to ``annotation``: int, float, bool, str, None, tuple[...] (comma
    separated), or a union of them (tried None, bool, int, float, tuple, str in that order)."""
    if _is_union(annotation):
        candidates = typing.get_args(annotation)
        order = (type(None), bool, int, float, tuple, list, str)
        ranked = sorted(candidates, key=lambda t: order.index(typing.get_origin(t) or t) if (typing.get_origin(t) or t) in order else len(order))
        for candidate in ranked:
            try:
                return convert(text, candidate)
            except (ValueError, TypeError):
                continue
        raise ValueError(f"{text!r} is not {type_name(annotation)}")
    origin = typing.get_origin(annotation) or annotation
    if origin is type(None):
        if text.strip().lower() in _NONE:
            return None
        raise ValueError(f"{text!r} is not None")
    if origin is bool:
        low = text.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ValueError(f"{text!r} is not a bool (use true/false)")
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis] or [str]
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        return origin(convert(p.strip(), args[min(i, len(args) - 1)]) for i, p in enumerate(parts))
    if origin is int:
        return int(text)
    if origin is float:
        return float(text)
    if origin is str:
        return text
    if annotation is Any:  # e.g. a baseline that may be a number or a tensor: a number if it reads as one
        try:
            return float(text)
        except ValueError:
            return text
    raise ValueError(f"options of type {type_name(annotation)} cannot be given on the command line")


def coerce(cls: type, key: str, value: Any) -> Any:
    """``value`` for option ``key`` of ``cls``: a string converted to the annotated type (as from
    the command line), anything else as it is."""
    annotation = option_types(cls).get(key, Any)
    if not isinstance(value, str) or annotation is str:
        return value
    try:
        return convert(value, annotation)
    except ValueError as error:
        raise MedlensError(f"{_label(cls)}: option {key}: {error}") from None


def parse_options(cls: type, pairs: Sequence[str]) -> dict[str, Any]:
    """``["top_k_channels=32", "eigen_smooth=true"]`` -> ``{"top_k_channels": 32, "eigen_smooth": True}``
    for method class ``cls``, converted to its annotated types; names checked as at construction."""
    types_ = option_types(cls)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise MedlensError(f"option {pair!r} must be written key=value")
        check_names(cls, [key])
        try:
            out[key] = convert(text.strip(), types_[key])
        except ValueError as error:
            raise MedlensError(f"{_label(cls)}: option {key}: {error}") from None
    return out


def signature_text(cls: type) -> list[tuple[str, str, str]]:
    """(name, type, default) rows describing a method's options, for ``medlens methods``."""
    types_, defaults = option_types(cls), option_defaults(cls)
    rows = []
    for name in option_names(cls):
        default = defaults[name]
        rows.append((name, type_name(types_[name]), "required" if default is dataclasses.MISSING else repr(default)))
    return rows


def first_paragraph(obj: Callable[..., Any] | type) -> str:
    """The first paragraph of a docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())
