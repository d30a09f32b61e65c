"""One way to save and load every result, and configs that save as the configs they are.

A saved result is a directory::

    result.json           {"kind", "schema_version", "rhlens_version", "fields": {...}}
    tensors.safetensors   every tensor field (only when there is one)
    <field>/              a nested result (itself saved this way)

A result class is a dataclass that inherits :class:`Result`; its fields are saved by type,
with no per-class code:

* a ``torch.Tensor``: into ``tensors.safetensors`` (dtype kept, bool included);
* a :class:`Config` (frozen settings): as ``{"__config__": {"type": ..., fields}}`` and loaded
  back as that config class, validated again by its ``__post_init__``;
* a :class:`Result`, or a list of them: into sub-directories;
* anything JSON can hold (numbers, strings, lists, dicts); tuples come back as tuples where
  the field is annotated ``tuple``.

``kind`` is the class name unless the class sets it; :func:`load_result` opens any saved
result by its kind. A class that changes its fields raises ``schema_version`` and overrides
:meth:`Result.upgrade` to read the older files (version 0 is a file written before this
protocol existed, when the class had its own format).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from rhlens.errors import ConfigError, ResultError, RhlensError
from rhlens.store.files import atomic_write, atomic_write_text, read_json, write_json
from rhlens.store.layout import LEGACY_RESULT_FILE, RESULT_FILE, TENSOR_FILE
from rhlens.store.registry import home_of
from rhlens.version import __version__

__all__ = [
    "Config",
    "Result",
    "ResultError",
    "atomic_write",
    "atomic_write_text",
    "load_result",
    "read_json",
    "write_json",
]


R = TypeVar("R", bound="Result")
C = TypeVar("C", bound="Config")


# ---- configs ---------------------------------------------------------------------------------
class Config:
    """Mixin for frozen settings dataclasses: ``to_dict()`` / ``from_dict()``, by class name."""

    _configs: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Config._configs[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        """``{"type": class name, field: value, ...}``, JSON-ready."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = _to_saved(getattr(self, f.name), f"{type(self).__name__}.{f.name}")
        return out

    @classmethod
    def saved_settings(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A saved form of this config as its fields (a config whose fields moved reads its
        older forms here; see :func:`rhlens.engine.holder.holds_generation`)."""
        return data

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """The config ``data`` describes (its ``type`` must be ``cls`` or a subclass)."""
        if not isinstance(data, dict):
            raise ConfigError(f"expected a {cls.__name__} as a JSON object, got {type(data).__name__}")
        name = data.get("type", cls.__name__)
        target = Config._configs.get(name)
        if target is None or not issubclass(target, cls):
            raise ConfigError(f"{name!r} is not a {cls.__name__}")
        data = target.saved_settings(data)
        names = {f.name: f for f in dataclasses.fields(target)}  # type: ignore[arg-type]
        unknown = sorted(k for k in data if k != "type" and k not in names)
        if unknown:
            raise ConfigError(f"{name} has no setting(s) {', '.join(unknown)} "
                              "(written by a newer rhlens?)")
        kwargs = {k: _restore(v, _field_type(target, names[k])) for k, v in data.items()
                  if k in names}
        return target(**kwargs)


# ---- results ---------------------------------------------------------------------------------
class Result:
    """Mixin for result dataclasses: ``save(dir)`` and ``load(dir)``, one protocol for all."""

    kind: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1
    _results: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("kind"):
            cls.kind = cls.__name__
        Result._results[cls.kind] = cls

    # -- writing --
    def save(self, directory: str | Path) -> Path:
        """Write this result into ``directory`` (created; files replaced atomically)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ResultError(f"cannot save into {directory}: it is a file, not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                tensors[f.name] = value.detach().cpu().contiguous()
                fields[f.name] = {"__tensor__": f.name}
            elif isinstance(value, Result):
                value.save(directory / f.name)
                fields[f.name] = {"__result__": f.name}
            elif isinstance(value, list) and value and all(isinstance(v, Result) for v in value):
                for i, v in enumerate(value):
                    v.save(directory / f.name / str(i))
                fields[f.name] = {"__results__": f.name, "n": len(value)}
            else:
                fields[f.name] = _to_saved(value, f"{type(self).__name__}.{f.name}")
        if tensors:
            atomic_write(directory / TENSOR_FILE, lambda tmp: save_file(tensors, tmp))
        doc = {"kind": self.kind, "schema_version": self.schema_version,
               "rhlens_version": __version__, "fields": fields}
        write_json(directory / RESULT_FILE, doc)
        return directory

    # -- reading --
    @classmethod
    def load(cls: type[R], directory: str | Path) -> R:
        """The result saved in ``directory``; it must be a ``cls`` (or a subclass)."""
        directory = Path(directory)
        doc = _read_doc(directory, cls)
        target = result_class(str(doc.get("kind", "")))
        if target is None or not issubclass(target, cls):
            raise ResultError(f"{directory} holds a {doc.get('kind')!r} result, not a {cls.kind}")
        version = doc.get("schema_version", 0)
        if not isinstance(version, int) or version > target.schema_version:
            raise ResultError(f"{directory} was written by a newer rhlens (schema {version} of "
                              f"{target.kind}; this one reads up to {target.schema_version}); "
                              "upgrade rhlens")
        if version < target.schema_version:
            doc = target.upgrade(doc, version, directory)
        return target._from_doc(doc, directory)

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Turn a document of an older ``version`` into the current one (override to support
        older files; version 0 is a file from before this protocol, ``doc`` then holds the
        old ``meta.json``)."""
        raise ResultError(f"{directory} holds a {cls.kind} in an old format (schema {version}) "
                          "that this rhlens cannot read; rerun the command that wrote it")

    @classmethod
    def _from_doc(cls: type[R], doc: dict[str, Any], directory: Path) -> R:
        fields = doc.get("fields")
        if not isinstance(fields, dict):
            raise ResultError(f"{directory / RESULT_FILE} has no 'fields' object (damaged?)")
        tensors = None
        kwargs: dict[str, Any] = {}
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for name, value in fields.items():
            if name not in known:
                continue  # a field this version dropped
            if isinstance(value, dict) and "__tensor__" in value:
                if tensors is None:
                    tensors = _read_tensors(directory)
                if value["__tensor__"] not in tensors:
                    raise ResultError(f"{directory / TENSOR_FILE} lacks tensor {value['__tensor__']!r}")
                kwargs[name] = tensors[value["__tensor__"]]
            elif isinstance(value, dict) and "__result__" in value:
                kwargs[name] = load_result(directory / value["__result__"])
            elif isinstance(value, dict) and "__results__" in value:
                kwargs[name] = [load_result(directory / value["__results__"] / str(i))
                                for i in range(int(value["n"]))]
            else:
                kwargs[name] = _restore(value, _field_type(cls, known[name]))
        try:
            return cls(**kwargs)
        except (TypeError, RhlensError) as exc:
            raise ResultError(f"{directory} does not hold a valid {cls.kind}: {exc}") from exc


def result_class(kind: str) -> type[Result] | None:
    """The class of results of ``kind``: registered already (its module is imported), or
    imported from the module registered as its home (:mod:`rhlens.store.registry`)."""
    if kind in Result._results:
        return Result._results[kind]
    home = home_of(kind)
    if home is not None:
        with contextlib.suppress(ImportError):
            importlib.import_module(home)
    return Result._results.get(kind)


def load_result(directory: str | Path) -> Result:
    """Whatever result is saved in ``directory``, as its own class."""
    return Result.load(directory)


def _read_doc(directory: Path, cls: type) -> dict[str, Any]:
    if not directory.exists():
        raise ResultError(f"{directory} does not exist")
    if not directory.is_dir():
        raise ResultError(f"{directory} is a file; a saved result is a directory")
    path = directory / RESULT_FILE
    if path.exists():
        doc = read_json(path, "result.json")
        if not isinstance(doc, dict):
            raise ResultError(f"{path} is damaged (not a JSON object)")
        return doc
    legacy = directory / LEGACY_RESULT_FILE  # the format before this protocol (schema 0)
    if legacy.exists():
        meta = read_json(legacy, "meta.json")
        if isinstance(meta, dict):
            return {"kind": meta.get("kind"), "schema_version": 0, "meta": meta}
    raise ResultError(f"{directory} holds no saved rhlens result (no {RESULT_FILE})")


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / TENSOR_FILE
    if not path.exists():
        raise ResultError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ResultError(f"{path} is damaged ({exc}); rerun the command that wrote it") from exc


# ---- JSON values -----------------------------------------------------------------------------
def _to_saved(value: Any, where: str) -> Any:
    """``value`` as JSON can hold it; a Config is tagged so it loads back as one."""
    if isinstance(value, Config):
        return {"__config__": value.to_dict()}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, (list, tuple)):
        return [_to_saved(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_saved(v, where) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _to_saved(value.item(), where)
    raise ResultError(f"{where}: cannot save a {type(value).__name__} (not JSON-able)")


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    """The field's annotation as a type where it can be resolved, else as its string."""
    if not isinstance(f.type, str):
        return f.type
    module = sys.modules.get(cls.__module__)
    try:
        # An annotation is code of the module that defines the class, evaluated as typing does.
        return eval(f.type, dict(vars(module)) if module else {})
    except Exception:
        return f.type


def _restore(value: Any, annotation: Any = "") -> Any:
    """A JSON value back as the annotation says: configs, non-finite floats, and tuples
    wherever the annotation has them (``tuple[...]``, ``list[tuple[int, int]]``, ...)."""
    if isinstance(annotation, str):  # unresolved: only a top-level tuple is known
        if isinstance(value, list) and annotation.startswith(("tuple", "Tuple")):
            return tuple(_restore(v) for v in value)
        annotation = Any
    if isinstance(value, dict):
        if "__config__" in value and len(value) == 1:
            return Config.from_dict(value["__config__"])
        if "__float__" in value and len(value) == 1:
            return float(value["__float__"])
        args = _shape_of(annotation, dict)
        inner = args[1] if len(args) == 2 else Any
        return {k: _restore(v, inner) for k, v in value.items()}
    if isinstance(value, list):
        origin, args = _shape_of(annotation, list, tuple)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_restore(v, args[0]) for v in value)
            if len(args) == len(value):
                return tuple(_restore(v, a) for v, a in zip(value, args))
            return tuple(_restore(v) for v in value)
        inner = args[0] if origin is list and args else Any
        return [_restore(v, inner) for v in value]
    return value


def _shape_of(annotation: Any, *origins: type) -> Any:
    """For ``dict`` alone: the type arguments of the first dict type in ``annotation``
    (unions searched). Otherwise ``(origin, args)`` of its first list/tuple type."""
    candidates = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    for c in candidates:
        origin = typing.get_origin(c) or c
        if origin in origins:
            if origins == (dict,):
                return typing.get_args(c)
            return origin, typing.get_args(c)
    return () if origins == (dict,) else (None, ())


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)
