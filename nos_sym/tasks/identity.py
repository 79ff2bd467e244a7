"""A task's identity as text: ``name@version/h``, ``h`` the first 16 hex digits of the sha256 of
the canonical JSON of ``{"name", "version", "config"}`` (standard library only, so the reward
store's schema migration can name the tasks of old rows without importing torch)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["description", "task_identity"]


def description(name: str, version: int | str, config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"name", "version", "config"}``: what :func:`task_identity` hashes."""
    return {"name": name, "version": version, "config": dict(config)}


def task_identity(name: str, version: int | str, config: Mapping[str, Any]) -> str:
    """``name@version/h`` (see the module docstring): equal exactly when name, version and
    configuration are."""
    text = json.dumps(description(name, version, config), sort_keys=True, separators=(",", ":"))
    return f"{name}@{version}/{hashlib.sha256(text.encode()).hexdigest()[:16]}"
