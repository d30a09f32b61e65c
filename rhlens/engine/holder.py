"""Analysis configs that *hold* one :class:`~rhlens.engine.GenerationConfig`.

An analysis that answers probes (detection, NIAH sweeps, the KV budget sweep) keeps its
generation settings in one field, ``generation``, instead of declaring ``max_new_tokens``,
``stop_at_newline``, ``prefill_chunk`` ... again. :func:`holds_generation` (put above
``@dataclass``) gives such a config what earlier versions had:

* the keyword arguments it used to declare (``NIAHConfig(max_new_tokens=20)``) still work,
  folded into ``generation``, with a :class:`DeprecationWarning`; so does reading them
  (``config.max_new_tokens``: ``config.generation.max_new_tokens``);
* ``config.with_generation(max_new_tokens=20)``: a copy with those settings changed and the
  config's other defaults kept;
* it saves as it always did: the generation settings the config used to declare stand beside
  its own fields (``{"type": "NIAHConfig", "max_new_tokens": 50, ...}``), any other one only
  where it differs from the config's default; so a saved config of any version loads, and an
  unchanged run has the run identity it had, so its folder resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

from rhlens.engine.policy import KernelPolicy
from rhlens.engine.runner import GenerationConfig
from rhlens.errors import ConfigError

__all__ = ["GENERATION_FIELDS", "holds_generation"]

GENERATION_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def holds_generation(*legacy: str):
    """Class decorator (above ``@dataclass``) for a config with a ``generation`` field.

    ``legacy``: the generation settings the config declared itself before it held one, in
    their saved order; they keep their place in its saved form (``policy`` saved as ``None``
    where it is the device's default, as it was).
    """
    unknown = [n for n in legacy if n not in GENERATION_FIELDS]
    if unknown:
        raise TypeError(f"not generation settings: {unknown}")

    def wrap(cls):
        field = {f.name: f for f in dataclasses.fields(cls)}.get("generation")
        if field is None or field.default_factory is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__} needs a field generation with a default_factory")
        default = field.default_factory()
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            flat = {k: kwargs.pop(k) for k in GENERATION_FIELDS if k in kwargs}
            if flat:
                given = ", ".join(f"{k}=..." for k in flat)
                warnings.warn(f"{cls.__name__}({given}) is deprecated: use {cls.__name__}(...)"
                              f".with_generation({given}), or pass generation=GenerationConfig(...)",
                              DeprecationWarning, stacklevel=2)
                base = kwargs.get("generation", default)
                if not isinstance(base, GenerationConfig):
                    raise ConfigError(f"generation must be a GenerationConfig, got {type(base).__name__}")
                kwargs["generation"] = dataclasses.replace(base, **flat)
            init(self, *args, **kwargs)
            if not isinstance(self.generation, GenerationConfig):
                raise ConfigError(f"generation must be a GenerationConfig, got "
                                  f"{type(self.generation).__name__}")

        def to_dict(self) -> dict[str, Any]:
            out = super(cls, self).to_dict()
            del out["generation"]
            for name in GENERATION_FIELDS:
                value = getattr(self.generation, name)
                if name in legacy:
                    out[name] = _saved(name, value)
                elif value != getattr(default, name):
                    out[name] = _saved(name, value, keep_default=True)
            return out

        @classmethod
        def saved_settings(klass, data: dict[str, Any]) -> dict[str, Any]:
            data = dict(data)
            flat = {k: data.pop(k) for k in GENERATION_FIELDS if k in data}
            if flat:
                if "generation" in data:
                    raise ConfigError(f"{klass.__name__} holds its generation settings in "
                                      f"generation or beside its fields, not both: {sorted(flat)}")
                base = {k: v for k, v in default.to_dict().items() if k != "policy"}
                data["generation"] = {"__config__": {**base, **flat}}
            return data

        @classmethod
        def from_settings(klass, settings: dict[str, Any]):
            """The config a settings dict of an older file describes (its fields, flat or
            as ``dataclasses.asdict`` gives them; settings this version dropped are ignored);
            ``None`` when it holds none (e.g. an imported paper file)."""
            settings = dict(settings)
            held = settings.pop("generation", None)
            if isinstance(held, dict):
                settings = {**held, **settings}
            if isinstance(settings.get("policy"), dict) and "__config__" not in settings["policy"]:
                settings["policy"] = {"__config__": {"type": "KernelPolicy", **settings["policy"]}}
            names = {*klass.__dataclass_fields__, *GENERATION_FIELDS} - {"generation", "type"}
            known = {k: v for k, v in settings.items() if k in names}
            return klass.from_dict({"type": klass.__name__, **known}) if known else None

        def with_generation(self, **changes: Any):
            """A copy with these generation settings changed, the others kept (this config's
            defaults included: ``DetectConfig().with_generation(max_new_tokens=32)`` still
            decodes 8 probes at a time)."""
            unknown = sorted(set(changes) - set(GENERATION_FIELDS))
            if unknown:
                raise ConfigError(f"not generation settings: {', '.join(unknown)}; "
                                  f"they are {', '.join(GENERATION_FIELDS)}")
            return dataclasses.replace(self, generation=dataclasses.replace(self.generation, **changes))

        def getter(name: str) -> property:
            def get(self) -> Any:
                warnings.warn(f"{cls.__name__}.{name} is deprecated: read "
                              f"config.generation.{name}", DeprecationWarning, stacklevel=2)
                return getattr(self.generation, name)
            get.__name__ = name
            return property(get, doc=f"``generation.{name}`` (deprecated).")

        cls.__init__ = __init__
        cls.to_dict = to_dict
        cls.saved_settings = saved_settings
        cls.from_settings = from_settings
        cls.with_generation = with_generation
        for name in GENERATION_FIELDS:
            if name not in cls.__dataclass_fields__:
                setattr(cls, name, getter(name))
        cls.legacy_generation = tuple(legacy)
        return cls

    return wrap


def _saved(name: str, value: Any, keep_default: bool = False) -> Any:
    if name == "policy":
        if not keep_default and value == KernelPolicy():
            return None  # the device's defaults: saved as earlier versions saved them
        return {"__config__": value.to_dict()}
    return value
