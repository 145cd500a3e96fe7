"""Turning config mappings into the dataclasses that sit next to the classes they configure.

One rule for every group: unknown keys, and values of the wrong type, are an error that
names the key, says what is expected, and is raised once at start-up. The command-line
tools report such errors (and a missing or unreadable file) as one line on stderr and
exit with status 2 (`runtime.cli.cli_errors`), not as a traceback.
"""
from __future__ import annotations

import os
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from runtime.cli import usage_exit

T = TypeVar("T")
CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_config(name: str = "config", overrides: list[str] | None = None):
    """conf/NAME.yaml with command-line style overrides, for tools that run outside
    `hydra.main` (benchmarks, checks, tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides or []))


def is_int(value: Any) -> bool:
    """An integer, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _matches(value: Any, tp: Any) -> bool:
    """Is `value` (plain YAML data) of the annotated type `tp`? Types the check does not
    know are left to the class that uses them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return is_int(value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if tp is dict or origin is dict:
        return isinstance(value, dict) and (not args or all(_matches(v, args[1]) for v in value.values()))
    return True


def describe(tp: Any) -> str:
    """What a value of type `tp` is, in words: 'an integer', 'null or a number', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if tp in (list, tuple) or origin in (list, tuple):
        return f"a list (each item {describe(args[0])})" if args and origin is list else "a list"
    if tp is dict or origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def check_type(value: Any, tp: Any, name: str) -> Any:
    """`value` (plain data, or an omegaconf node: returned as plain data) if it is of type
    `tp`, else ValueError naming `name` and what is expected."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if (tp is dict or typing.get_origin(tp) is dict) and isinstance(value, dict) and typing.get_args(tp):
        for key, item in value.items():  # a mapping's entries are named on their own
            check_type(item, typing.get_args(tp)[1], f"{name}.{key}")
        return value
    if not _matches(value, tp):
        raise ValueError(f"{name} must be {describe(tp)}, got {value!r}")
    return value


def strict_dataclass(cls: type[T], d: Any, group: str) -> T:
    """Build `cls` from a mapping (or omegaconf node), rejecting keys it does not know and
    values that are not of their field's annotated type.

    `group` names the config in the message, e.g. "model" or "controller (scripted)"; its
    first word prefixes the key in a type error ("controller.loop must be ...")."""
    from omegaconf import DictConfig, OmegaConf

    d = OmegaConf.to_container(d, resolve=True) if isinstance(d, DictConfig) else dict(d)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {group} config keys {unknown}; expected a subset of {sorted(known)}")
    hints = typing.get_type_hints(cls)
    prefix = group.split()[0]
    for key, value in d.items():
        check_type(value, hints.get(key, Any), f"{prefix}.{key}")
    return cls(**d)


def config_int(value: Any, name: str, minimum: int | None = None, optional: bool = False) -> int | None:
    """An integer setting read from a config (None allowed if `optional`), at least
    `minimum`; ValueError naming `name` otherwise."""
    if optional and value is None:
        return None
    if not is_int(value) or (minimum is not None and value < minimum):
        expected = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise ValueError(f"{name} must be {'null or ' if optional else ''}{expected}, got {value!r}")
    return value


def check_config_files(prog: str, argv: list[str]) -> None:
    """Before Hydra reads them: each config file a `GROUP=OPTION` argument picks
    (conf/GROUP/OPTION.yaml, say a world of one's own) parses as YAML; otherwise one line,
    `PROG: error: FILE, line L, column C: PROBLEM`, and exit 2 (Hydra would print the
    parser's traceback)."""
    import yaml

    for arg in argv:
        group, sep, option = arg.lstrip("+~").partition("=")
        path = CONF / group / f"{option}.yaml"
        if not sep or not group.isidentifier() or not option or not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
            if context and start is not None:  # where the construct that went wrong began
                problem += f" ({context} from line {start.line + 1}, column {start.column + 1})"
            raise usage_exit(prog, f"{path}{where}: {problem} (a YAML syntax error; note that an unquoted # "
                             "starts a comment: quote colours)") from None


def check_engine(cfg: Any) -> None:
    """A tool that measures the model (bench, evaluation) needs engine=neural (a config
    that names no engine kind, such as the random-weight bench's, is the model's)."""
    kind = cfg.engine.get("kind")
    if kind not in (None, "neural"):
        raise ValueError(f"engine={kind} has no model to measure here; expected engine=neural (the default)")


def check_creatable(path: str, key: str, writable: bool = True) -> None:
    """`path` is a directory or can be made one (and, if `writable`, written): nothing but
    a directory stands where it or one of its parents would be, no link on the way leads
    nowhere, and the nearest existing one is writable. ValueError naming `key` otherwise
    (found at start-up, not when the first file is written)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        if p.is_symlink():
            raise ValueError(f"{key} {path!r} cannot be made: {str(p)!r} is a link to {os.readlink(p)!r}, "
                             "which does not exist")
        p = p.parent
    if not p.is_dir():
        what = "a file" if p.is_file() else "not a directory"
        raise ValueError(f"{key} {path!r} cannot be a directory: {str(p)!r} is {what}")
    if writable and not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{key} {path!r} cannot be written: {str(p)!r} is not writable")


def check_writable_file(path: str, key: str) -> None:
    """`path` names a file that can be written (made or replaced): not a directory, its
    directory creatable and writable (check_creatable); ValueError naming `key` otherwise."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{key} {path!r} is a directory; expected a file path")
    if p.is_symlink() and not p.exists():
        raise ValueError(f"{key} {path!r} is a link to {os.readlink(p)!r}, which does not exist")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{key} {path!r} cannot be written: it is read-only")
    check_creatable(str(p.parent), f"{key}'s directory")
