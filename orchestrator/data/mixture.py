"""data.mixture: weighted sources, checked once at launch (no torch, no files touched here)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from orchestrator.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # also a metric-name suffix (val_loss/<name>) in MLflow
_KEYS = ("name", "source", "weight", "text_field")
_EXAMPLE = "data.mixture=[{name:web,source:/data/web,weight:0.7},{name:code,source:/data/code,weight:0.3}]"


@dataclass(frozen=True)
class MixtureSource:
    name: str
    source: str
    weight: float  # normalised: the weights of a mixture sum to 1
    text_field: str
    key: str  # the config key that names the source, for messages: data.mixture[1].source


def mixture_sources(data) -> list[MixtureSource]:
    """data.mixture as a list of sources with normalised weights; data.source alone when it is empty."""
    entries = data.mixture or []
    if not entries:
        return [MixtureSource("", data.source, 1.0, data.text_field, "data.source")]
    parsed, names = [], set()
    for i, entry in enumerate(entries):
        key = f"data.mixture[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(key, entry, "expected a mapping {name, source, weight}", f"write {_EXAMPLE}")
        unknown = sorted(set(entry) - set(_KEYS))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", entry[unknown[0]], "unknown key", f"use only {', '.join(_KEYS)}")
        for required in ("source", "weight"):
            if entry.get(required) in (None, ""):
                raise ConfigError(f"{key}.{required}", entry.get(required), "missing", f"write {_EXAMPLE}")
        name = str(entry.get("name") or f"source{i}")
        if not _NAME.match(name) or name in names:
            raise ConfigError(f"{key}.name", name, "must be unique and use only letters, digits, '_', '.', '-'",
                              f"rename it, e.g. {key}.name=web")
        names.add(name)
        weight = entry["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{key}.weight", weight, "must be a finite number >= 0",
                              "give every source a non-negative weight, e.g. 0.7")
        text_field = entry.get("text_field") or data.text_field
        if not isinstance(text_field, str):
            raise ConfigError(f"{key}.text_field", text_field, "expected a string", "quote the field name")
        parsed.append((name, str(entry["source"]), float(weight), text_field, f"{key}.source"))
    total = sum(w for _, _, w, _, _ in parsed)
    if total <= 0:
        raise ConfigError("data.mixture", [w for _, _, w, _, _ in parsed], "weights sum to zero",
                          "give at least one source a positive weight")
    return [MixtureSource(n, s, w / total, t, k) for n, s, w, t, k in parsed]


def check_mixture(data) -> None:
    """Launch-time check of data.mixture and data.num_workers (ConfigError, exit 2)."""
    if not isinstance(data.num_workers, int) or data.num_workers < 1:
        raise ConfigError("data.num_workers", data.num_workers, "must be at least 1", "set data.num_workers=1 (or the cores to use)")
    if not data.text_field:
        raise ConfigError("data.text_field", data.text_field, "is empty", "set data.text_field=text")
    mixture_sources(data)
