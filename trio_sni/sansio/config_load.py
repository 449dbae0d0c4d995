"""Turn a JSON mapping into a :class:`~.config.Config`, reporting every problem at once.

One cattrs converter structures the whole tree. It is strict where cattrs is lenient by
default: ``"8443"`` is not an int, ``true`` is not a number, an object is not a list, and
unknown keys are errors (a typo'd key silently ignored is a policy silently not applied).
Problems come out as ``path: message`` lines, e.g. ``listeners[0].port: expected int``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from .config import Config
from .errors import ConfigError

_TYPE_NAMES = {int: "int", float: "number", str: "string", bool: "bool"}


class _WrongType(TypeError):
    """A JSON value of the wrong type; the message is the whole explanation."""


def _strict_int(value: object, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _WrongType(f"expected int, got {_json_type(value)}")
    return value


def _strict_float(value: object, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _WrongType(f"expected number, got {_json_type(value)}")
    return float(value)


def _strict_str(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise _WrongType(f"expected string, got {_json_type(value)}")
    return value


def _strict_bool(value: object, _: type) -> bool:
    if not isinstance(value, bool):
        raise _WrongType(f"expected true or false, got {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook(float, _strict_float)
    converter.register_structure_hook(str, _strict_str)
    converter.register_structure_hook(bool, _strict_bool)

    def is_tuple(tp: Any) -> bool:
        return get_origin(tp) is tuple

    def structure_tuple(value: object, tp: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _WrongType(f"expected list, got {_json_type(value)}")
        (item_type, _ellipsis) = get_args(tp)
        items, errors = [], []
        for i, item in enumerate(value):
            try:
                items.append(converter.structure(item, item_type))
            except Exception as exc:
                exc.__notes__ = [*getattr(exc, "__notes__", []), f"__index__{i}"]
                errors.append(exc)
        if errors:
            raise IterableValidationError("While structuring a list", errors, tp)
        return tuple(items)

    def is_dict(tp: Any) -> bool:
        return get_origin(tp) is dict

    def structure_dict(value: object, tp: Any) -> dict[Any, Any]:
        if not isinstance(value, dict):
            raise _WrongType(f"expected object, got {_json_type(value)}")
        _key_type, value_type = get_args(tp)
        out, errors = {}, []
        for key, item in value.items():
            try:
                out[key] = converter.structure(item, value_type)
            except Exception as exc:
                exc.__notes__ = [*getattr(exc, "__notes__", []), f"__key__{key}"]
                errors.append(exc)
        if errors:
            raise IterableValidationError("While structuring an object", errors, tp)
        return out

    def is_literal(tp: Any) -> bool:
        return get_origin(tp) is Literal

    def structure_literal(value: object, tp: Any) -> object:
        choices = get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            shown = ", ".join(json.dumps(c) for c in choices)
            raise _WrongType(f"expected one of {shown}, got {json.dumps(value)}")
        return value

    def is_attrs_class(tp: Any) -> bool:
        return attrs.has(tp)

    def validate_raw_fields(tp: type, value: dict[str, Any], skip: set[Any]) -> list[Exception]:
        """Run the validators of the fields that did structure, one field at a time."""
        attrs.resolve_types(tp)
        errors: list[Exception] = []
        for field in attrs.fields(tp):
            if field.validator is None or field.name in skip or field.name not in value:
                continue
            try:
                field_value = converter.structure(value[field.name], field.type)
                field.validator(None, field, field_value)
            except ValueError as exc:
                errors.append(exc)
            except Exception:
                pass
        return errors

    def structure_attrs_factory(tp: type) -> Any:
        inner: Callable[[Mapping[str, Any], Any], Any] = converter.gen_structure_attrs_fromdict(tp)

        def structure(value: object, _: type) -> Any:
            if not isinstance(value, dict):
                raise _WrongType(f"expected object, got {_json_type(value)}")
            # attrs stops at the first failing validator; run them all ourselves so the
            # operator sees every bad field of an object at once.
            was_disabled = attrs.validators.get_disabled()
            attrs.validators.set_disabled(True)
            try:
                obj = inner(value, tp)
            except ClassValidationError as exc:
                # Some fields have the wrong type; still check the values of the others.
                failed = {
                    getattr(note, "name", None)
                    for sub in exc.exceptions
                    for note in getattr(sub, "__notes__", [])
                }
                extra = validate_raw_fields(tp, value, failed)
                if not extra:
                    raise
                raise ClassValidationError(exc.message, [*exc.exceptions, *extra], tp) from None
            finally:
                attrs.validators.set_disabled(was_disabled)
            errors: list[Exception] = []
            for field in attrs.fields(tp):
                if field.validator is not None:
                    try:
                        field.validator(obj, field, getattr(obj, field.name))
                    except ValueError as exc:
                        errors.append(exc)
            if errors:
                raise ClassValidationError(f"While structuring {tp.__name__}", errors, tp)
            return obj

        return structure

    converter.register_structure_hook_func(is_tuple, structure_tuple)
    converter.register_structure_hook_func(is_dict, structure_dict)
    converter.register_structure_hook_func(is_literal, structure_literal)
    converter.register_structure_hook_factory(is_attrs_class, structure_attrs_factory)
    return converter


_CONVERTER = _make_converter()
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\[[^\]]+\])*): (.*)$", re.S)


def _problems(exc: BaseException, path: str) -> list[str]:
    """Flatten cattrs' exception tree into ``path: message`` lines."""
    if isinstance(exc, ClassValidationError | IterableValidationError):
        lines: list[str] = []
        for sub in exc.exceptions:
            lines.extend(_problems(sub, _join(path, _note_step(sub))))
        return lines
    if isinstance(exc, ExceptionGroup):  # a validator's problems with several list items
        return [line for sub in exc.exceptions for line in _problems(sub, path)]
    if isinstance(exc, ForbiddenExtraKeysError):
        return [
            f"{_join(path, _key_step(key))}: unknown key "
            f"(allowed: {', '.join(_allowed_keys(exc.cl))})"
            for key in sorted(exc.extra_fields)
        ]
    if isinstance(exc, KeyError) and any(
        type(note).__name__ == "AttributeValidationNote" for note in getattr(exc, "__notes__", [])
    ):
        return [f"{path}: required key missing"]
    message = (
        str(exc) if isinstance(exc, _WrongType | ValueError) else f"{type(exc).__name__}: {exc}"
    )
    field_match = _FIELD_PREFIX.match(message)
    if field_match:
        # Validators say "port: must be ..."; hang that field under the current path.
        return [f"{_join(path, field_match[1])}: {field_match[2]}"]
    return [f"{path or '(top level)'}: {message}"]


def _note_step(exc: BaseException) -> str:
    for note in getattr(exc, "__notes__", []):
        if type(note) is str:  # our own list/object notes; cattrs' notes are str subclasses
            if note.startswith("__index__"):
                return f"[{note.removeprefix('__index__')}]"
            if note.startswith("__key__"):
                return f"[{json.dumps(note.removeprefix('__key__'))}]"
            continue
        name = getattr(note, "name", None)
        if name is not None:
            return str(name)
        index = getattr(note, "index", None)
        if index is not None:
            return f"[{index}]"
    return ""


def _key_step(key: str) -> str:
    """A key as a path step; keys no one could read unquoted ("", ";", "a b") are quoted."""
    return key if key.isascii() and key.isidentifier() else f"[{json.dumps(key)}]"


def _join(path: str, step: str) -> str:
    if not step:
        return path
    if step.startswith("[") or not path:
        return path + step
    return f"{path}.{step}"


def _allowed_keys(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls)]


def load_config(data: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a JSON-shaped mapping.

    Raises:
        ConfigError: listing every problem, each as ``path: message``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError([f"(top level): expected object, got {_json_type(data)}"])
    try:
        return _CONVERTER.structure(dict(data), Config)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(_problems(exc, "")) from None


def load_config_text(text: str, *, source: str = "<config>") -> Config:
    """Parse JSON text and load it; JSON syntax errors say where they are."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]
        ) from None
    return load_config(data)


def dump_config(config: Config) -> dict[str, Any]:
    """The effective configuration as JSON-ready data (defaults filled in)."""
    raw: dict[str, Any] = _CONVERTER.unstructure(config)
    return raw
