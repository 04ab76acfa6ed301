"""What the model configs share: conversion to and from dicts and JSON (checkpoints store the JSON)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping


class ConfigIO:
    """Mixin of the model config dataclasses: :meth:`from_dict`, :meth:`to_dict`, :meth:`to_json`,
    :meth:`from_json`. Unknown keys raise a ValueError naming them and the known ones."""

    #: Keys of a mapping that :meth:`from_dict` skips (a config class may skip others' bookkeeping).
    @staticmethod
    def _skipped_key(key: str) -> bool:
        return False

    @classmethod
    def from_dict(cls, data: Mapping):
        """The config from a mapping of its fields; unknown keys raise a ValueError naming them."""
        if not isinstance(data, Mapping):
            raise TypeError(f"config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if not cls._skipped_key(str(k))}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
        return cls(**fields)

    def to_dict(self) -> dict:
        """The fields as a dict (tuples kept as tuples)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as a JSON string (stored in checkpoints)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        """Inverse of :meth:`to_json`; unknown keys raise a ValueError."""
        return cls.from_dict(json.loads(text))
