"""Loading: YAML + dotted overrides -> JobConfig, with errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dlray.config.dotted import ConfigError, messages, set_dotted
from dlray.config.job import JobConfig


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job YAML, apply `a.b.c=value` overrides, and validate. Raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"job file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a job file must be a YAML mapping, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    cfg = config_from_dict(data)
    if cfg.run.name is None and path is not None:
        # A fresh name per invocation: re-running the same name resumes that run instead.
        from datetime import datetime

        cfg.run.name = f"{path.stem}-{datetime.now():%Y%m%d-%H%M%S}"
    return cfg


def config_from_dict(data: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError("invalid job config:\n" + "\n".join(f"  - {m}" for m in messages(err, JobConfig))) from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3, true, [1,2] work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    set_dotted(data, key, yaml.safe_load(raw) if raw else None)


def job_files(root: str | os.PathLike = "jobs") -> list[Path]:
    """Every shipped job YAML, for tests and `dlray validate --all`."""
    return sorted(Path(root).rglob("*.yaml"))
