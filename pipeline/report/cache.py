"""report/cache.json: the report's own measurements (latency per artifact, the deployment
preprocessing row, the calibration-method comparison), each stored under the key of what it
measured, so a report of a cached build is quick."""

from __future__ import annotations

import json
from pathlib import Path

CACHE_FILE = "cache.json"


def read_cache(folder: Path) -> dict:
    try:
        cache = json.loads((folder / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def cached(cache: dict, name: str, key: str, measure):
    """`cache[name]` when it was made under `key`; else measure, store and return it."""
    entry = cache.get(name)
    if isinstance(entry, dict) and entry.get("key") == key:
        return entry["value"]
    value = measure()
    cache[name] = {"key": key, "value": value}
    return value
