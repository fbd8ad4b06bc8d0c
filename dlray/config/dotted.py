"""Dotted keys (`optim.lr`): setting one in a nested dict, and naming them in validation errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A job config that cannot run; the message names every offending key."""


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    node[leaf] = value


def messages(err: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per error of validating `root`, naming the dotted key."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(fields_at(root, e["loc"][:-1]))
            out.append(f"unknown key '{loc}'; allowed keys here: {allowed}")
        elif e["type"] == "value_error":
            # Our own validators already name the key.
            out.append(e["msg"].removeprefix("Value error, "))
        else:
            msg = e["msg"].replace("Input should be", "must be")
            out.append(f"{loc}: {msg}, got {e.get('input')!r}")
    return out


def fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed in the section of `root` at `loc`."""
    model = root
    for part in loc:
        if str(part) not in model.model_fields:  # a key of a dict of sections (tune.search_space.<key>)
            continue
        annotation = model.model_fields[str(part)].annotation
        if getattr(annotation, "__origin__", None) is dict:
            annotation = annotation.__args__[1]
        # Optional sections (e.g. serve.autoscaling) are `X | None`.
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = candidates[0]
    return list(model.model_fields)
