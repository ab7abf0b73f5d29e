"""Experiment configuration: a frozen dataclass per experiment, overridable from the command line.

An experiment declares its knobs once, as a frozen dataclass whose fields each carry a docstring
(a string literal on the line after the field, as in CleanRL and big_vision)::

    @dataclasses.dataclass(frozen=True)
    class Config:
        seed: int = 0
        \"\"\"Seed of every random key in the run.\"\"\"
        lr: float = 1e-3
        \"\"\"Adam learning rate.\"\"\"

    if __name__ == "__main__":
        main(parse_config(Config))

and this module turns that class into a command line:

- ``--lr 3e-4`` or ``--lr=3e-4`` overrides a field; ``--ppo.lr 3e-4`` a field of a nested config;
- booleans: ``--flag``, ``--no-flag``, ``--flag false``;
- tuples and lists: ``--sizes 64 64``, ``--sizes 64,64`` or ``--sizes [64,64]``;
- ``Optional`` fields take ``none``;
- ``--config run.json`` loads a JSON file first (as written by ``save_config``); the other flags
  then override it;
- ``--help`` lists every field with its type, default and docstring.

Every value is checked against the field's type before the experiment starts: an unknown key or a
value of the wrong type, on the command line or in the file, is an error that names the key and the
type it expects. Nothing here is global: each experiment's class is the whole schema.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import os
import sys
import textwrap
import types
import typing
from typing import Any, Mapping, Sequence

__all__ = [
    "ConfigError",
    "parse_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "load_config",
    "field_docs",
    "help_text",
]

_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1", "yes", "y", "on")
_FALSE_WORDS = ("false", "0", "no", "n", "off")


class ConfigError(ValueError):
    """A configuration value that does not fit the config class (unknown key, wrong type, ...)."""


# ----------------------------------------------------------------------------------------------
# Reading the class: field types and per-field docstrings.
# ----------------------------------------------------------------------------------------------


def _check_dataclass(config_cls: type) -> None:
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"expected a dataclass type, got {config_cls!r}")


def _field_types(config_cls: type) -> dict[str, Any]:
    """Resolved type of each field (string annotations evaluated where possible)."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # e.g. a class defined inside a function, with string annotations
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(config_cls)}


def field_docs(config_cls: type) -> dict[str, str]:
    """Docstring of each field: the string literal that follows its annotated assignment.

    Parsed from the class source (and its dataclass bases') with ``ast``; falls back to
    ``field(metadata={"help": ...})``. Fields without either get no entry.
    """
    _check_dataclass(config_cls)
    docs: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
            class_node = ast.parse(source).body[0]
        except (OSError, TypeError, SyntaxError, IndexError):
            continue
        body = getattr(class_node, "body", [])
        for stmt, following in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    for f in dataclasses.fields(config_cls):
        if f.name not in docs and "help" in f.metadata:
            docs[f.name] = str(f.metadata["help"])
    return docs


def _default_of(f: dataclasses.Field) -> Any:
    """The field's default value, or ``dataclasses.MISSING`` for a required field."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """Short readable name of a type annotation, for help and error messages."""
    if tp is type(None):
        return "None"
    if isinstance(tp, str):
        return tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1 and len(args) == 2:
            return f"Optional[{_type_name(non_none[0])}]"
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "{" + ", ".join(repr(a) for a in args) + "}"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if not args:
            return name
        return f"{name}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------------------------
# Checking and converting values.
# ----------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a JSON-like ``value`` against annotation ``tp``; return it in the field's type.

    Strict: ``True`` is not an int, ``"3"`` is not a float; an int is accepted for a float and a
    list for a tuple. Raises ``ConfigError`` naming ``key`` and the expected type.
    """

    def fail(reason: str = "") -> ConfigError:
        detail = f" ({reason})" if reason else ""
        return ConfigError(
            f"config key {key!r}: expected {_type_name(tp)}, got {value!r}"
            f" of type {type(value).__name__}{detail}"
        )

    if tp is Any or isinstance(tp, str) or isinstance(tp, typing.TypeVar):
        return value
    if tp is type(None):
        if value is None:
            return None
        raise fail()
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise fail()
    if origin is typing.Literal:
        if value in args:
            return value
        raise fail()
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return config_from_dict(tp, value, _prefix=key + ".")
        raise fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if tp in (tuple, list) or origin in (tuple, list, Sequence, typing.Sequence):
        container = tuple if (tp is tuple or origin in (tuple, Sequence, typing.Sequence)) else list
        if not isinstance(value, (list, tuple)):
            raise fail()
        if not args:
            return container(value)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise fail(f"needs exactly {len(args)} items")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return container(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise fail()
        if len(args) == 2:
            return {
                _coerce(k, args[0], f"{key}.<key>"): _coerce(v, args[1], f"{key}.{k}")
                for k, v in value.items()
            }
        return dict(value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise fail()
    return value  # an annotation this module does not know: pass the value through unchecked


def _parse_text(text: str, tp: Any, key: str) -> Any:
    """Convert one command-line string into a value of annotation ``tp``."""

    def fail() -> ConfigError:
        return ConfigError(f"--{key}: expected {_type_name(tp)}, got {text!r}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or isinstance(tp, str):
        try:
            return json.loads(text)
        except ValueError:
            return text
    if _is_union(tp):
        if text.strip().lower() in _NONE_WORDS and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _parse_text(text, option, key)
            except ConfigError:
                pass
        raise fail()
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise fail()
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise fail()
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise fail() from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise fail() from None
    if tp is str:
        return text
    if _is_sequence_type(tp):
        return _coerce_sequence_text([text], tp, key)
    # dicts, nested dataclasses given whole, and anything else: JSON.
    try:
        value = json.loads(text)
    except ValueError:
        raise fail() from None
    return _coerce(value, tp, "--" + key)


def _is_sequence_type(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return tp in (tuple, list) or origin in (tuple, list, Sequence, typing.Sequence)


def _is_bool_type(tp: Any) -> bool:
    return tp is bool or (_is_union(tp) and bool in typing.get_args(tp))


def _coerce_sequence_text(items: list[str], tp: Any, key: str) -> Any:
    """Values of a tuple/list field from its command-line words.

    ``--sizes 64 64``, ``--sizes 64,64`` and ``--sizes [64,64]`` all give ``(64, 64)``;
    ``--sizes []`` gives an empty sequence.
    """
    if len(items) == 1:
        text = items[0].strip()
        if text.startswith("["):
            try:
                return _coerce(json.loads(text), tp, "--" + key)
            except ValueError:
                raise ConfigError(f"--{key}: expected {_type_name(tp)}, got {text!r}") from None
        items = [part for part in text.split(",") if part.strip()] if text else []
    args = typing.get_args(tp)
    if not args:
        element_types = [str] * len(items)
    elif len(args) == 2 and args[1] is Ellipsis or typing.get_origin(tp) is not tuple:
        element_types = [args[0]] * len(items)
    else:
        if len(items) != len(args):
            raise ConfigError(
                f"--{key}: expected {_type_name(tp)} ({len(args)} values), got {len(items)}: {items}"
            )
        element_types = list(args)
    values = [_parse_text(t.strip(), et, f"{key}[{i}]") for i, (t, et) in enumerate(zip(items, element_types))]
    container = list if typing.get_origin(tp) is list or tp is list else tuple
    return container(values)


# ----------------------------------------------------------------------------------------------
# dict <-> config.
# ----------------------------------------------------------------------------------------------


def _unknown_key_error(key: str, known: Sequence[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(
        f"unknown config key {prefix + key!r}{hint} (known keys: {', '.join(prefix + k for k in known)})"
    )


def config_from_dict(config_cls: type, values: Mapping[str, Any], *, _prefix: str = "") -> Any:
    """Build ``config_cls`` from a (nested) dict of JSON-like values, checking every key and type.

    Missing keys take the field defaults; a missing required field, an unknown key or a value of
    the wrong type raises ``ConfigError``. A nested dataclass field merges the given sub-dict into
    its default instance.
    """
    _check_dataclass(config_cls)
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"config {_prefix.rstrip('.') or config_cls.__name__}: expected a mapping, got {values!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    types_by_name = _field_types(config_cls)
    for key in values:
        if key not in fields:
            raise _unknown_key_error(key, list(fields), _prefix)
    kwargs = {}
    for name, f in fields.items():
        tp = types_by_name[name]
        if name in values:
            value = values[name]
            default = _default_of(f)
            if _is_dataclass_type(tp) and isinstance(value, Mapping) and dataclasses.is_dataclass(default):
                value = {**config_to_dict(default), **value}
            kwargs[name] = _coerce(value, tp, _prefix + name)
        elif _default_of(f) is dataclasses.MISSING:
            raise ConfigError(
                f"config key {_prefix + name!r} ({_type_name(tp)}) is required and has no default"
            )
    return config_cls(**kwargs)


def _to_json_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):  # numpy / jax scalars
        return value.item()
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as a nested dict of JSON values (tuples become lists)."""
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise TypeError(f"expected a dataclass instance, got {config!r}")
    return _to_json_value(config)


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the config as indented JSON (creating parent directories)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(config_to_dict(config), f, indent=2)
        f.write("\n")


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {os.fspath(path)}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {os.fspath(path)} is not valid JSON: {err}") from None


def load_config(config_cls: type, path: str | os.PathLike) -> Any:
    """Read a JSON file written by ``save_config`` back into ``config_cls`` (checked strictly)."""
    return config_from_dict(config_cls, _read_json(path))


# ----------------------------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------------------------


def _flat_fields(config_cls: type, prefix: str = "") -> dict[str, tuple[Any, Any, str]]:
    """``{"dotted.name": (type, default, doc)}`` for every leaf field; nested configs are flattened."""
    docs = field_docs(config_cls)
    types_by_name = _field_types(config_cls)
    out: dict[str, tuple[Any, Any, str]] = {}
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        tp, default = types_by_name[f.name], _default_of(f)
        if _is_dataclass_type(tp):
            nested = _flat_fields(tp, prefix + f.name + ".")
            if dataclasses.is_dataclass(default):  # the parent's default overrides the nested class'
                for name, (sub_tp, _, sub_doc) in nested.items():
                    sub_default = default
                    for part in name[len(prefix + f.name) + 1 :].split("."):
                        sub_default = getattr(sub_default, part)
                    nested[name] = (sub_tp, sub_default, sub_doc)
            out.update(nested)
        else:
            out[prefix + f.name] = (tp, default, docs.get(f.name, ""))
    return out


def help_text(config_cls: type, prog: str | None = None) -> str:
    """The ``--help`` page: usage, the class docstring, then each field's type, default and doc."""
    prog = prog or os.path.basename(sys.argv[0] or "script.py")
    lines = [f"usage: {prog} [--config PATH.json] [--FIELD VALUE ...]", ""]
    class_doc = inspect.getdoc(config_cls)
    if class_doc and not class_doc.startswith(config_cls.__name__ + "("):  # skip dataclass' auto doc
        lines += [class_doc, ""]
    lines += [
        "options:",
        "  -h, --help",
        "      Show this message and exit.",
        "  --config PATH.json",
        "      Load a config file (as saved in a run's config.json) before the flags below.",
    ]
    for name, (tp, default, doc) in _flat_fields(config_cls).items():
        shown_default = "required" if default is dataclasses.MISSING else f"default: {default!r}"
        flag = f"--{name} / --no-{name}" if _is_bool_type(tp) else f"--{name}"
        lines.append(f"  {flag}  {_type_name(tp)}  ({shown_default})")
        for doc_line in (doc or "(no description)").splitlines():
            lines.append(f"      {doc_line}".rstrip())
    return "\n".join(lines) + "\n"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {} if node is None else config_to_dict(node) if dataclasses.is_dataclass(node) else node
        tree = node
    tree[parts[-1]] = value


def _resolve_flag(name: str, fields: Mapping[str, Any]) -> str:
    """The field a flag names; dashes may stand for underscores (``--max-steps``)."""
    if name in fields:
        return name
    underscored = name.replace("-", "_")
    return underscored if underscored in fields else name


def _parse_flags(config_cls: type, argv: Sequence[str]) -> tuple[str | None, list[tuple[str, Any]], bool]:
    """Split argv into (config file path, [(dotted field, typed value)], help requested)."""
    fields = _flat_fields(config_cls)
    config_path, overrides, want_help = None, [], False
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in ("-h", "--help"):
            want_help = True
            continue
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: options look like --field value")
        name, has_equals, inline_value = token[2:].partition("=")
        words = [inline_value] if has_equals else []
        if not has_equals:
            while i < len(argv) and not argv[i].startswith("--") and argv[i] != "-h":
                words.append(argv[i])
                i += 1
        if name == "config" and "config" not in fields:
            if len(words) != 1:
                raise ConfigError("--config: expected exactly one path to a JSON file")
            config_path = words[0]
            continue
        name = _resolve_flag(name, fields)
        if name not in fields and name.startswith("no-") and _resolve_flag(name[3:], fields) in fields:
            field_name = _resolve_flag(name[3:], fields)
            tp = fields[field_name][0]
            if not _is_bool_type(tp):
                raise ConfigError(f"--{name}: --no-X is only for bool fields; {field_name} is {_type_name(tp)}")
            if words:
                raise ConfigError(f"--{name} takes no value (got {words})")
            overrides.append((field_name, False))
            continue
        if name not in fields:
            raise _unknown_key_error(name, list(fields), "--")
        tp = fields[name][0]
        if _is_sequence_type(tp) or (
            _is_union(tp) and any(_is_sequence_type(a) for a in typing.get_args(tp)) and not
            (len(words) == 1 and words[0].strip().lower() in _NONE_WORDS)
        ):
            seq_tp = tp if _is_sequence_type(tp) else next(a for a in typing.get_args(tp) if _is_sequence_type(a))
            if not words:
                raise ConfigError(f"--{name}: expected {_type_name(tp)}, got no value")
            overrides.append((name, _coerce_sequence_text(words, seq_tp, name)))
        elif not words:
            if not _is_bool_type(tp):
                raise ConfigError(f"--{name}: expected a value of type {_type_name(tp)}")
            overrides.append((name, True))
        elif len(words) > 1:
            raise ConfigError(f"--{name}: expected one value of type {_type_name(tp)}, got {words}")
        else:
            overrides.append((name, _parse_text(words[0], tp, name)))
    return config_path, overrides, want_help


def parse_config(config_cls: type, argv: Sequence[str] | None = None, *, prog: str | None = None) -> Any:
    """Build ``config_cls`` from defaults, an optional ``--config`` JSON file and command-line flags.

    Args:
      config_cls: a dataclass type (usually frozen) with a docstring per field.
      argv: the flags, without the program name. ``None`` reads ``sys.argv[1:]``.
      prog: the program name shown by ``--help``.

    Returns:
      A ``config_cls`` instance. ``--help`` prints the help page and exits with status 0.

    Raises:
      ConfigError: on an unknown flag or key, or a value of the wrong type, when ``argv`` is given.
        When ``argv`` is ``None`` (a real command line) the message is printed to stderr and the
        program exits with status 2, without a traceback.
    """
    _check_dataclass(config_cls)
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config_path, overrides, want_help = _parse_flags(config_cls, argv)
        if want_help:
            print(help_text(config_cls, prog))
            raise SystemExit(0)
        values: dict[str, Any] = _read_json(config_path) if config_path else {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {config_path}: expected a JSON object at the top level")
        for dotted, value in overrides:
            _set_dotted(values, dotted, value)
        return config_from_dict(config_cls, values)
    except ConfigError as err:
        if not from_command_line:
            raise
        print(f"{prog or os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
