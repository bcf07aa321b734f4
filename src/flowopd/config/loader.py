"""Typed configs: nested dataclasses whose fields carry help text, loaded from YAML + overrides.

A config is a ``@dataclass`` whose fields are plain types (``int``, ``float``, ``bool``,
``str``, ``list[...]``, ``tuple[...]``, ``dict[str, ...]``, ``X | None``, ``Literal[...]``)
or other config dataclasses (a YAML mapping = a nested dataclass). Each field documents
itself with ``field(default=..., metadata={"help": "..."})``::

    @dataclass
    class TrainConfig:
        lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})

    cfg = load_config(RunConfig, "run.yaml", ["train.lr=1e-4"])

Loading type-checks and coerces every value, rejects unknown keys with the closest valid
one suggested, and then calls each dataclass's optional ``validate(self)`` (innermost
first), which raises :class:`~flowopd.errors.UserError` for inconsistent values. Every
error is one line naming the key and the fix, e.g.
``unknown config key 'train.lrr' (did you mean 'lr'?); valid keys in 'train': ...``.

A dataclass may set ``_shorthand: ClassVar[str] = "name"`` so that a scalar given where
the section is expected fills that one field (``reward: ocr`` == ``reward: {name: ocr}``),
and ``_moved: ClassVar[dict[str, str]]`` for keys it no longer has, relative to itself
and dotted for keys of its sections: loading ``train.clip_range`` where the run config
sets ``_moved = {"train.clip_range": "moved to grpo.clip_range"}`` (in YAML or as an
override) raises ``train.clip_range moved to grpo.clip_range``.

Why not a library: pydantic, omegaconf, tyro, draccus and jsonargparse each do part of
this, but none gives one-line errors with a near-spelling hint, the ``key=value`` override
syntax the CLI and pipeline use, ``Literal`` / tuple / union coercion and NaN rejection
together; the commit that split this package says more.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from flowopd.errors import UserError, closest

__all__ = [
    "load_config",
    "config_from_dict",
    "read_config_file",
    "apply_overrides",
    "validate_config",
    "dump_config",
    "config_to_dict",
    "config_help",
]

T = TypeVar("T")

_MISSING = dataclasses.MISSING


# --------------------------------------------------------------------------------------
# public API


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    validate: bool = True,
) -> T:
    """Build ``cls`` from the YAML file ``path`` (or the defaults when None) and overrides.

    overrides: ``["train.lr=1e-4", "sample.group_size=12", "eval.benchmarks=[a, b]"]``;
    each value is parsed as a YAML scalar / flow list / flow mapping and applied in order,
    after the file. ``validate=False`` skips the ``validate()`` hooks (e.g. to inspect a
    preset whose data files are not on this machine).
    """
    data: Any = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        data = read_config_file(path)
    cfg = _build_dataclass(cls, data, "", where)
    cfg = apply_overrides(cfg, overrides)
    if validate:
        validate_config(cfg)
    return cfg


def config_from_dict(cls: type[T], data: Mapping[str, Any], *, validate: bool = True) -> T:
    """Build ``cls`` from a (nested) mapping with the same checks as :func:`load_config`."""
    cfg = _build_dataclass(cls, data, "", "mapping")
    if validate:
        validate_config(cfg)
    return cfg


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a YAML config file holds, with its ``extends:`` chain merged in.

    ``extends: other.yaml`` (a path relative to the file's folder) loads that file first
    and lays this one over it: mappings merge key by key, any other value (a list
    included) replaces the inherited one. Chains are followed; a cycle is an error.
    """
    return _read_extended(Path(path), ())


def _read_extended(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    data = _read_yaml_mapping(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise UserError(
            f"config file '{path}': extends must be a file path, got {parent!r}; "
            "e.g. extends: _grpo.yaml"
        )
    base = path.parent / parent
    here = path.resolve()
    if base.resolve() in (*chain, here):
        names = " -> ".join(p.name for p in (*chain, here, base.resolve()))
        raise UserError(f"config file '{path}': extends loops ({names}); break the cycle")
    if not base.is_file():
        raise UserError(
            f"config file '{path}': extends '{parent}', which is not a file next to it "
            f"({base}); fix the path"
        )
    return _merged(_read_extended(base, (*chain, here)), data)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``: nested mappings merged, everything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    """One YAML file's top-level mapping ({} for an empty file); one-line errors."""
    if not path.is_file():
        raise UserError(f"config file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(
            f"config file '{path}' is not UTF-8 text ({e.reason} at byte {e.start}); "
            "pass a YAML config (see configs/) or re-save it as UTF-8"
        ) from None
    except OSError as e:
        raise UserError(
            f"config file '{path}' cannot be read ({e.strerror}); fix its path or permissions"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(
            f"config file '{path}': invalid YAML{at}: {problem}; fix the file "
            "(configs/ holds working examples)"
        ) from None
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, Mapping):
        raise UserError(
            f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}"
        )
    return dict(data)


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """A copy of ``cfg`` with ``key=value`` / ``section.key=value`` overrides applied.

    List elements are addressed by index (``data.datasets.1.path=x.jsonl``). A whole
    section can be replaced by a flow mapping (``reward={weights: {ocr: 1.0}}``). Does not
    call ``validate()``: validate once after all changes with :func:`validate_config`.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override '{item}' must look like key=value (e.g. train.lr=1e-4)")
        _set_path(cfg, key, raw.strip())
    return cfg


def validate_config(cfg: Any) -> None:
    """Call ``validate()`` on every nested config dataclass, innermost first, then ``cfg``."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate_config(value)
        elif isinstance(value, list):
            for item in value:
                if dataclasses.is_dataclass(item):
                    validate_config(item)
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        hook()


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dicts/lists/scalars (tuples become lists), YAML/JSON-serialisable."""
    return _plain(cfg)


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML; ``load_config(type(cfg), <that file>)`` gives it back."""
    header = f"# flowopd {type(cfg).__name__} (resolved; every key, defaults included)\n"
    return header + yaml.dump(
        _plain(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
    )


class _Dumper(yaml.SafeDumper):
    """Sections as block mappings, lists of scalars inline (``betas: [0.9, 0.999]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (list, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    # an empty mapping reads better as {} than as a dangling key
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=not data)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(dict, _represent_dict)


def config_help(cls: type) -> str:
    """Every key of ``cls`` with its type, default and help text, section by section."""
    lines: list[str] = []
    _help_lines(cls, "", lines)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# building and coercion


def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves the string annotations of `from __future__ import annotations`.
    return typing.get_type_hints(cls)


def _join(prefix: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{prefix}.{name}" if prefix else str(name)
    return f"{prefix}.{name}" if prefix else name


def _where(where: str) -> str:
    return f" (in {where})" if where not in ("defaults", "") else ""


def _check_moved(cls: type, data: Mapping[str, Any], prefix: str, where: str) -> None:
    """UserError ``'train.clip_range moved to grpo.clip_range'`` when ``data`` holds a key
    that ``cls._moved`` lists (``'key'`` of this section or ``'section.key'`` below it)."""
    for path, note in getattr(cls, "_moved", {}).items():
        node: Any = data
        for part in path.split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is not _MISSING:  # a key this config had once: say where it went
            raise UserError(f"{_join(prefix, path)} {note}{_where(where)}")


def _unknown_key(cls: type, key: str, prefix: str, where: str) -> UserError:
    names = [f.name for f in dataclasses.fields(cls)]
    full = _join(prefix, key)
    # 'lr=1e-4' at the top level: point to the section that has exactly that key, before
    # guessing a near spelling in this section, then a near spelling in a nested section.
    exact = [p for p in _leaf_paths(cls, prefix) if p.rpartition(".")[2] == key]
    if exact:
        hint = f" (did you mean '{exact[0]}'?)"
    else:
        hint = closest(key, names) or _nested_hint(cls, key, prefix)
    section = f"'{prefix}'" if prefix else "the top level"
    return UserError(
        f"unknown config key '{full}'{hint}{_where(where)}; valid keys in {section}: "
        f"{', '.join(names)}"
    )


def _nested_hint(cls: type, key: str, prefix: str) -> str:
    """' (did you mean 'train.lr'?)' when ``key`` is close to a key of a nested section."""
    by_leaf: dict[str, str] = {}
    for path in _leaf_paths(cls, prefix):
        by_leaf.setdefault(path.rpartition(".")[2], path)
    match = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.5)
    return f" (did you mean '{by_leaf[match[0]]}'?)" if match else ""


def _leaf_paths(cls: type, prefix: str) -> list[str]:
    out: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.extend(_leaf_paths(tp, _join(prefix, f.name)))
        else:
            out.append(_join(prefix, f.name))
    return out


def _build_dataclass(cls: type[T], data: Any, prefix: str, where: str) -> T:
    shorthand = getattr(cls, "_shorthand", None)
    if shorthand and not isinstance(data, Mapping) and data is not None:
        data = {shorthand: data}
    if not isinstance(data, Mapping):
        what = f"'{prefix}'" if prefix else "the config"
        raise UserError(f"{what} must be a mapping of keys{_where(where)}, got {_describe(data)}")
    _check_moved(cls, data, prefix, where)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key not in fields:
            raise _unknown_key(cls, key, prefix, where)
        kwargs[key] = _coerce(value, hints[key], _join(prefix, key), where)
    for name, f in fields.items():
        if name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:
            raise UserError(f"missing required config key '{_join(prefix, name)}'{_where(where)}")
    return cls(**kwargs)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({type(value).__name__})"


def _type_error(key: str, expected: str, value: Any, where: str) -> UserError:
    return UserError(
        f"config key '{key}' expects {expected}, got {_describe(value)}{_where(where)}; "
        f"fix the value (e.g. {key}={_example(expected)})"
    )


def _example(expected: str) -> str:
    return {
        "an integer": "8",
        "a number": "0.5",
        "true or false": "true",
        "a string": "name",
    }.get(expected, "...")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _coerce_float(value: Any, key: str, where: str) -> float:
    """A finite float from a YAML number or any float spelling ('1e-4'); NaN / inf refused."""
    if isinstance(value, bool):
        raise _type_error(key, "a number", value, where)
    number: float | None = None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        # PyYAML (YAML 1.1) reads '1e-4' as a string: accept every float spelling.
        with contextlib.suppress(ValueError):
            number = float(value.strip())
    if number is None:
        raise _type_error(key, "a number", value, where)
    if not math.isfinite(number):
        # no setting means anything at nan or +-inf; they only surface epochs later
        raise UserError(
            f"config key '{key}' must be a finite number, got {value!r}{_where(where)}; "
            f"fix the value (e.g. {key}=0.5)"
        )
    return number


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (e.g. list -> tuple)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if _is_union(tp):
        return _coerce_union(value, tp, key, where)
    if origin is Literal:
        return _coerce_literal(value, typing.get_args(tp), key, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key, where)
    if tp in _SCALARS:
        return _SCALARS[tp](value, key, where)
    if origin in (list, tuple, Sequence):
        return _coerce_sequence(value, tp, key, where)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _type_error(key, _type_name(tp), value, where)
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_tp, f"{key}.{k}", where): _coerce(v, val_tp, f"{key}.{k}", where)
            for k, v in value.items()
        }
    raise TypeError(f"config key '{key}': unsupported annotation {tp!r}")


def _coerce_union(value: Any, tp: Any, key: str, where: str) -> Any:
    """``X | Y | None``: None when allowed, else the first member that accepts the value."""
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _type_error(key, _type_name(tp), value, where)
    errors = []
    for member in (a for a in args if a is not type(None)):
        try:
            return _coerce(value, member, key, where)
        except UserError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    raise _type_error(key, _type_name(tp), value, where)


def _coerce_literal(value: Any, args: tuple, key: str, where: str) -> Any:
    if value in args and not isinstance(value, bool):
        return value
    if isinstance(value, str) and all(isinstance(a, str) for a in args):
        choices = ", ".join(str(a) for a in args)
        raise UserError(
            f"config key '{key}' has unknown value '{value}'{closest(value, args)}"
            f"{_where(where)}; choose one of: {choices}"
        )
    raise _type_error(key, "one of " + "|".join(repr(a) for a in args), value, where)


def _coerce_bool(value: Any, key: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _type_error(key, "true or false", value, where)


def _coerce_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool):
        raise _type_error(key, "an integer", value, where)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip().replace("_", ""))
    raise _type_error(key, "an integer", value, where)


def _coerce_str(value: Any, key: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # 'name: 2024' in YAML means the string
    raise _type_error(key, "a string", value, where)


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _coerce_sequence(value: Any, tp: Any, key: str, where: str) -> list | tuple:
    """``list[X]`` / ``tuple[X, ...]`` / ``tuple[X, Y]``; a lone scalar means ``[scalar]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, (str, bytes, Mapping)) or value is None:
        if origin is list and value is not None and not isinstance(value, Mapping):
            value = [value]  # 'eval.benchmarks=ocr' means ['ocr']
        else:
            raise _type_error(key, _type_name(tp), value, where)
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, _type_name(tp), value, where)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise UserError(
                f"config key '{key}' expects {len(args)} values ({_type_name(tp)}), "
                f"got {len(value)}{_where(where)}"
            )
        return tuple(
            _coerce(v, a, f"{key}[{i}]", where)
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    item_tp = args[0] if args else Any
    items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


# --------------------------------------------------------------------------------------
# overrides


def _is_stringy(tp: Any) -> bool:
    """True when the annotation accepts free text, so the raw override text is meant."""
    if tp is str:
        return True
    if _is_union(tp):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(members) == 1 and members[0] is str
    return False


def _parse_value(raw: str, tp: Any, key: str) -> Any:
    if _is_stringy(tp):
        # 'output.dir=2024' or 'model.path=org/name: x' mean the text itself; only YAML's
        # null spellings map to None for optional strings.
        if raw in ("null", "~", "None", "none") and tp is not str:
            return None
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            return str(yaml.safe_load(raw))  # name='a b' -> a b
        return raw
    try:
        return yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        raise UserError(
            f"override '{key}={raw}': the value is not valid YAML; quote it or use "
            f"[a, b] for lists and {{k: v}} for mappings"
        ) from None


def _nested(parts: list[str]) -> dict[str, Any]:
    """``['train', 'lr']`` -> ``{'train': {'lr': None}}``: an override's key as a mapping."""
    node: dict[str, Any] = {parts[-1]: None}
    for part in reversed(parts[:-1]):
        node = {part: node}
    return node


def _set_path(cfg: Any, key: str, raw: str) -> None:
    parts = key.split(".")
    obj: Any = cfg
    prefix = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            cls = type(obj)
            _check_moved(cls, _nested(parts[i:]), prefix, "overrides")
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                raise _unknown_key(cls, part, prefix, "overrides")
            tp = _hints(cls)[part]
            path = _join(prefix, part)
            if last:
                value = _coerce(_parse_value(raw, tp, path), tp, path, "overrides")
                setattr(obj, part, value)
                return
            obj, prefix = getattr(obj, part), path
        elif isinstance(obj, list):
            if not part.isdigit() or int(part) >= len(obj):
                raise UserError(
                    f"override '{key}': '{prefix}' is a list of {len(obj)} item(s); "
                    f"address an item by its index 0..{max(len(obj) - 1, 0)}"
                )
            idx = int(part)
            if last:
                raise UserError(
                    f"override '{key}': set the whole list ({prefix}=[...]) or a key of "
                    f"one item ({prefix}.{idx}.KEY=...)"
                )
            obj, prefix = obj[idx], f"{prefix}.{idx}"
        else:
            raise UserError(
                f"override '{key}': '{prefix}' is a value, not a section; use {prefix}=VALUE"
            )


# --------------------------------------------------------------------------------------
# dumping and help


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value  # scalars; yaml writes .inf/.nan and reads them back


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "|".join(repr(a) for a in args)
    if origin in (list, tuple, dict, Sequence, Mapping):
        name = {Sequence: "list", Mapping: "dict"}.get(origin, origin.__name__)
        if origin is tuple and args and args[-1] is Ellipsis:
            args = args[:1]
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _help_lines(cls: type, prefix: str, lines: list[str]) -> None:
    doc = (cls.__doc__ or "").strip().splitlines()
    # dataclasses invent a signature docstring when none is written: skip it
    title = doc[0] if doc and not doc[0].startswith(cls.__name__ + "(") else ""
    hints = _hints(cls)
    leaves = []
    nested = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            nested.append((_join(prefix, f.name), tp))
        else:
            leaves.append(f)
            item = _list_item_dataclass(tp)
            if item is not None:  # a list of sections: document one item's keys
                nested.append((_join(prefix, f.name) + ".N", item))
    if prefix or leaves:
        lines.append(f"[{prefix or 'top level'}]" + (f"  {title}" if title else ""))
    for f in leaves:
        default = _default_of(f)
        shown = (
            "required"
            if default is _MISSING
            else yaml.safe_dump(_plain(default), default_flow_style=True, width=1000)
            .strip()
            .removesuffix("...")
            .strip()
        )
        lines.append(f"  {_join(prefix, f.name)}: {_type_name(hints[f.name])} = {shown}")
        text = f.metadata.get("help", "")
        if text:
            lines.append(f"      {text}")
    for path, tp in nested:
        if lines:
            lines.append("")
        _help_lines(tp, path, lines)


def _list_item_dataclass(tp: Any) -> type | None:
    if typing.get_origin(tp) in (list, Sequence):
        args = typing.get_args(tp)
        if args and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None
