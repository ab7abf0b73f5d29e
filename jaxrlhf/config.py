"""Experiment configuration: a frozen dataclass per experiment, parsed from the command line by tyro.

An experiment declares its knobs once, as a frozen dataclass whose fields each carry a docstring
(a string literal on the line after the field)::

    @dataclasses.dataclass(frozen=True)
    class Config:
        seed: int = 0
        \"\"\"Seed of every random key in the run.\"\"\"
        lr: float = 1e-3
        \"\"\"Adam learning rate.\"\"\"

    if __name__ == "__main__":
        main(parse_config(Config))

`tyro` turns that class into the command line (flags keep the field names, underscores and all):

- ``--lr 3e-4`` or ``--lr=3e-4`` overrides a field; ``--ppo.lr 3e-4`` a field of a nested config;
- booleans are flag pairs: ``--flag`` and ``--no-flag`` (``--ppo.no_flag`` for a nested one);
- tuples and lists take one word per item: ``--seeds 0 1 2``;
- ``Optional`` fields take ``None``;
- ``--help`` lists every field with its type, default and docstring;
- an unknown flag, a missing required field or a value of the wrong type exits with status 2 and a
  message that names the flag, before the experiment starts.

What tyro does not do is added here: ``--config run.json`` loads a JSON file (as written by
``save_config`` into each run directory) whose values become the defaults that the other flags then
override. The file is checked strictly (`ConfigError` names an unknown key, or a key whose value
does not have the field's type). Nothing here is global: each experiment's class is the whole schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import os
import sys
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "UnknownFieldError",
    "refuse_unknown_fields",
    "unknown_field_message",
    "parse_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "load_config",
]

_CONFIG_FLAG_HELP = (
    "--config PATH.json: load a config file (a run's config.json, as written by save_config) "
    "first; the other flags override its values."
)


class ConfigError(ValueError):
    """A config file or dict that does not fit the config class (unknown key, wrong type, ...)."""


def _check_dataclass(config_cls: type) -> None:
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"expected a dataclass type, got {config_cls!r}")


# ----------------------------------------------------------------------------------------------
# dict <-> config: strict, since a JSON file has no command-line parser in front of it.
# ----------------------------------------------------------------------------------------------


def _field_types(config_cls: type) -> dict[str, Any]:
    """Resolved type of each field (string annotations evaluated where possible)."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # e.g. a class defined inside a function, with string annotations
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(config_cls)}


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ConfigError(f"config field {f.name!r} has no default")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """Short readable name of a type annotation, for error messages."""
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


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a JSON value against annotation ``tp``; return it in the field's type.

    Strict: ``True`` is not an int, ``"3"`` is not a float; an int is accepted for a float and a
    list for a tuple. Raises ``ConfigError`` naming ``key`` and the expected type.
    """

    def fail(reason: str = "") -> ConfigError:
        detail = f" ({reason})" if reason else ""
        return ConfigError(
            f"config key {key!r}: expected {_type_name(tp)}, got {value!r} of type {type(value).__name__}{detail}"
        )

    if tp is Any or isinstance(tp, (str, typing.TypeVar)):
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
        container = list if (tp is list or origin is list) else tuple
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
            return {_coerce(k, args[0], f"{key}.<key>"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise fail()
    return value  # an annotation this module does not know: passed through unchecked


# A field's old or foreign name -> its name here: names of an older jaxrlhf version (PPOConfig's
# clip ranges, GAE lambda and KL coefficient, the SFT optimizer's AdamW constants) and the names TRL,
# OpenRLHF and verl give the same settings, so that a config saved by an older version, or a setting
# carried over from another library, is refused with the name to use rather than as an unknown key.
# A tuple lists the candidates of configs that name the setting differently (the first field the
# config has is the hint); a name is only mapped where the meaning is the same.
RENAMED_FIELDS: dict[str, str | tuple[str, ...]] = {
    # older jaxrlhf (and TRL's PPOConfig)
    "cliprange": "clip_eps",
    "cliprange_high": "clip_eps_high",
    "cliprange_value": "value_clip_eps",
    "lam": "gae_lambda",
    "init_kl_coef": "kl_coef",
    "b1": "adam_b1",
    "b2": "adam_b2",
    "eps": "adam_eps",
    # TRL
    "num_ppo_epochs": "ppo_epochs",
    "mini_batch_size": "minibatch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "response_length": "max_new_tokens",
    "max_completion_length": ("max_new_tokens", "max_response_len"),
    "max_prompt_length": "max_prompt_len",
    "adap_kl_ctrl": "adaptive_kl",
    "horizon": "kl_horizon",
    "epsilon": "clip_eps",
    "epsilon_high": "clip_eps_high",
    "beta": "kl_coef",
    "loss_type": "loss",
    # Hugging Face TrainingArguments (TRL's trainers inherit them)
    "adam_beta1": "adam_b1",
    "adam_beta2": "adam_b2",
    "adam_epsilon": "adam_eps",
    "lr": "learning_rate",
    # OpenRLHF
    "eps_clip": "clip_eps",
    "value_clip": "value_clip_eps",
    "actor_learning_rate": "learning_rate",
    "kl_target": "target_kl",
    "n_samples_per_prompt": "num_generations",
    "generate_max_len": "max_new_tokens",
    "prompt_max_len": "max_prompt_len",
    "max_epochs": "ppo_epochs",
    "lambd": "gae_lambda",
    "entropy_loss_coef": "entropy_coef",
    # verl
    "clip_ratio": "clip_eps",
    "clip_ratio_high": "clip_eps_high",
    "clip_ratio_c": "dual_clip",
    "entropy_coeff": "entropy_coef",
    "loss_agg_mode": "loss_agg",
}


def renamed_field_message(key: str, known: Collection[str], prefix: str = "") -> str | None:
    """``"... was renamed to ..."`` when ``key`` is the old (or another library's) name of one of
    the ``known`` fields; None otherwise (also when ``key`` is itself a known field)."""
    if key in known:
        return None
    candidates = RENAMED_FIELDS.get(key, ())
    new = next((c for c in ((candidates,) if isinstance(candidates, str) else candidates) if c in known), None)
    if new is None:
        return None
    return (
        f"config key {prefix + key!r} was renamed to {prefix + new!r} (the name in an older jaxrlhf, "
        f"TRL, OpenRLHF or verl; use {new!r})"
    )


def unknown_field_message(key: str, known: Sequence[str], prefix: str = "") -> str:
    """The one message for a key that is not a field of a config: the rename hint when ``key`` is a
    field's old or foreign name (`RENAMED_FIELDS`), else the closest field names and every field.
    Used by `load_config` / `config_from_dict` and by the constructors of `refuse_unknown_fields`."""
    renamed = renamed_field_message(key, known, prefix)
    if renamed:
        return renamed
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return f"unknown config key {prefix + key!r}{hint} (known keys: {', '.join(prefix + k for k in known)})"


def _unknown_key_error(key: str, known: Sequence[str], prefix: str) -> ConfigError:
    return ConfigError(unknown_field_message(key, known, prefix))


class UnknownFieldError(ConfigError, TypeError):
    """A config constructor got a keyword that is not one of its fields (a `ConfigError`, and a
    `TypeError` as Python's own unexpected-keyword error is)."""


def refuse_unknown_fields(config_cls: type[T]) -> type[T]:
    """Class decorator for a config dataclass: its constructor refuses an unknown keyword with
    `unknown_field_message` (the rename hint, or the closest field names), as `load_config` does,
    instead of Python's bare ``TypeError: unexpected keyword argument``.

    Put it above ``@dataclasses.dataclass``; the fields are read from `dataclasses.fields` at call
    time, so a config that gains fields needs nothing else. ``dataclasses.replace`` goes through it
    too. Positional arguments and the fields' own checks (``__post_init__``) are left as they are.
    """
    _check_dataclass(config_cls)
    fields_of: Any = config_cls  # a dataclass (checked above), which type[T] does not say
    init = config_cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        names = [f.name for f in dataclasses.fields(fields_of) if f.init]
        for key in kwargs:
            if key not in names:
                raise UnknownFieldError(f"{config_cls.__name__}: {unknown_field_message(key, names)}")
        init(self, *args, **kwargs)

    setattr(config_cls, "__init__", __init__)  # noqa: B010 - pyright keeps the dataclass signature
    return config_cls


def config_from_dict(config_cls: type, values: Mapping[str, Any], *, _prefix: str = "") -> Any:
    """Build ``config_cls`` from a (nested) dict of JSON values, checking every key and type.

    Missing keys take the field defaults; a missing required field, an unknown key or a value of
    the wrong type raises ``ConfigError``. A nested dataclass field merges the given sub-dict into
    its default instance, so a file may hold only the values it changes.
    """
    _check_dataclass(config_cls)
    if not isinstance(values, Mapping):
        raise ConfigError(f"config {_prefix.rstrip('.') or config_cls.__name__}: expected a mapping, got {values!r}")
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
            if _is_dataclass_type(tp) and isinstance(value, Mapping) and _has_default(f):
                default = _default_of(f)
                if dataclasses.is_dataclass(default):
                    value = {**config_to_dict(default), **value}
            kwargs[name] = _coerce(value, tp, _prefix + name)
        elif not _has_default(f):
            raise ConfigError(f"config key {_prefix + name!r} ({_type_name(tp)}) is required and has no default")
    return config_cls(**kwargs)


def _to_json_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    item = getattr(value, "item", None)
    if callable(item):  # numpy / jax scalars
        return item()
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


def _read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            values = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {os.fspath(path)}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {os.fspath(path)} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {os.fspath(path)}: expected a JSON object at the top level")
    return values


def load_config(config_cls: type, path: str | os.PathLike) -> Any:
    """Read a JSON file written by ``save_config`` back into ``config_cls`` (checked strictly)."""
    return config_from_dict(config_cls, _read_json_object(path))


# ----------------------------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------------------------


def _split_config_flag(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Take ``--config PATH`` (or ``--config=PATH``) out of argv: (path or None, the other words)."""
    config_path, rest = None, []
    words = iter(argv)
    for word in words:
        if word == "--config" or word.startswith("--config="):
            if config_path is not None:
                raise ConfigError("--config given twice")
            config_path = word.partition("=")[2] if "=" in word else next(words, None)
            if not config_path or config_path.startswith("--"):
                raise ConfigError("--config: expected the path of a JSON file")
        else:
            rest.append(word)
    return config_path, rest


def parse_config(config_cls: type, argv: Sequence[str] | None = None, *, prog: str | None = None) -> Any:
    """Build ``config_cls`` from its defaults, an optional ``--config`` JSON file and command-line flags.

    The file's values replace the class defaults; tyro then parses the other flags on top of them
    (``tyro.cli(config_cls, default=<the file's config>)``).

    Args:
      config_cls: a dataclass type (usually frozen) with a docstring per field.
      argv: the flags, without the program name. ``None`` reads ``sys.argv[1:]``.
      prog: the program name shown by ``--help``.

    Returns:
      A ``config_cls`` instance. ``--help`` prints the help page and exits with status 0.

    Raises:
      SystemExit: status 2 (tyro's message on stderr, naming the flag) on an unknown flag, a missing
        required field or a value that does not parse as the field's type.
      ConfigError: on a bad ``--config`` file (unreadable, unknown key, wrong type) when ``argv`` is
        given. When ``argv`` is ``None`` (a real command line) the message is printed to stderr and
        the program exits with status 2, without a traceback, as tyro does for flags.
    """
    _check_dataclass(config_cls)
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    field_names = {f.name for f in dataclasses.fields(config_cls)}
    try:
        config_path, argv = (None, argv) if "config" in field_names else _split_config_flag(argv)
        file_config = load_config(config_cls, config_path) if config_path else None
    except ConfigError as err:
        if not from_command_line:
            raise
        print(f"{prog or os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    class_doc = inspect.cleandoc(config_cls.__doc__ or "")
    if class_doc.startswith(config_cls.__name__ + "("):  # dataclasses' generated signature: no doc
        class_doc = ""
    description = f"{class_doc.strip()}\n\n{_CONFIG_FLAG_HELP}".strip()
    file_defaults = {} if file_config is None else {"default": file_config}
    import tyro  # only the command line needs it

    return tyro.cli(config_cls, args=argv, prog=prog, description=description, use_underscores=True, **file_defaults)
