"""Dotted keys (`optim.lr`): setting one in a nested dict, and naming them in validation errors."""

from __future__ import annotations

from typing import Annotated, Any, get_args, get_origin

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
        keys, model, union, tag = walk(root, e["loc"][:-1])
        loc = ".".join(keys + [str(p) for p in e["loc"][-1:]])
        if e["type"] == "extra_forbidden":
            owners = [name for name, member in union.items() if e["loc"][-1] in member.model_fields]
            if owners:  # a key of another section of the union: strategy.zero_stage under strategy.name 'ddp'
                selector = ".".join(keys + ["name"])
                out.append(f"{loc} applies only to {selector} {' or '.join(map(repr, owners))}, got {selector} {tag!r}")
            else:
                out.append(f"unknown key '{loc}'; allowed keys here: {', '.join(model.model_fields if model else ())}")
        elif e["type"] == "union_tag_invalid":  # the `name` of a union's section: strategy.name=horovod
            out.append(f"{loc}.name: must be {' or '.join(e['ctx']['expected_tags'].rsplit(', ', 1))}, got {e['ctx']['tag']!r}")
        elif e["type"] == "value_error":
            # Our own validators already name the key.
            out.append(e["msg"].removeprefix("Value error, "))
        else:
            msg = e["msg"].replace("Input should be", "must be")
            out.append(f"{loc}: {msg}, got {e.get('input')!r}")
    return out


def walk(root: type[BaseModel], loc: tuple) -> tuple[list[str], type[BaseModel] | None, dict[str, type[BaseModel]], str | None]:
    """The section of `root` at `loc`: its dotted keys (without the `name` tags pydantic puts in the location of a
    union's section), its class, and where it is one of a union's sections, the union ({name: class}) and its name."""
    keys: list[str] = []
    model: type[BaseModel] | None = root
    union: dict[str, type[BaseModel]] = {}
    tag = None
    parts = [str(p) for p in loc]
    while parts:
        part = parts.pop(0)
        keys.append(part)
        if model is None or part not in model.model_fields:  # a key of a dict of sections (tune.search_space.<key>)
            continue
        annotation = model.model_fields[part].annotation
        if get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        # Optional sections (serve.autoscaling) are `X | None`; a union's sections (strategy) are `Annotated[X, Tag(name)] | ...`.
        members = [a for a in (get_args(a)[0] if get_origin(a) is Annotated else a for a in get_args(annotation) or (annotation,))
                   if isinstance(a, type) and issubclass(a, BaseModel)]
        union = {get_args(m.model_fields["name"].annotation)[0]: m for m in members} if len(members) > 1 else {}
        tag = parts.pop(0) if union and parts and parts[0] in union else None
        model = union[tag] if tag else (members[0] if members else None)
    return keys, model, union, tag


def fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed in the section of `root` at `loc`."""
    model = walk(root, loc)[1]
    return list(model.model_fields) if model else []
