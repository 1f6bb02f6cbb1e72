"""Command-line options defined by config fields: one option per field, its help, type and default read
from the dataclass field (``ase_bptt.runs.config.option``), so the CLI cannot drift from the config."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import click

from ase_bptt.cli._group import one_line
from ase_bptt.cli.options import RegistryChoice

#: What ``--patience off`` (and the like) turns into: the field's None, which the user asked for.
OFF = "off"


class _Word(click.ParamType):
    """A number, or a word: ``off`` for a field whose None switches the setting off, ``auto`` for one
    the run decides from the data (ase_bptt.runs.config.AUTO)."""

    def __init__(self, inner: click.ParamType, words: tuple[str, ...]) -> None:
        self.inner, self.words = inner, words
        self.name = "|".join((inner.name, *words))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() in self.words:
            return value.strip().lower()
        if isinstance(value, str) and value.strip().lower() == "none" and OFF in self.words:
            return OFF
        return self.inner.convert(value, param, ctx)


def _shown_default(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (its factory called)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{f.name} has no default")


def shown_default(f: dataclasses.Field) -> str:
    """How ``--help`` shows a config field's default (``[default: ...]``)."""
    meta = f.metadata["cli"]
    return meta["shown"] or _shown_default(field_default(f))


def _click_type(hint: Any, meta: Mapping[str, Any], default: Any) -> Any:
    """The click type of a config field: its annotation's number type, with the words ``off`` (where
    None switches a setting off that is on by default) and ``auto`` (where the default is AUTO)."""
    from ase_bptt.runs.config import AUTO

    choices = meta["choices"]
    if choices:
        return RegistryChoice(choices) if callable(choices) else click.Choice(choices)
    args = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
    numbers = [t for t in (int, float) if t in args]
    if not numbers:
        return click.STRING
    words = (AUTO,) * (default == AUTO) + (OFF,) * (type(None) in args and default is not None)
    inner = click.INT if numbers == [int] else click.FLOAT
    return _Word(inner, words) if words else inner


def config_params(
    cls: type, *names: str, nested: str | None = None, flags: Mapping[str, str] | None = None
) -> list[click.Parameter]:
    """Command-line options for the config fields ``names`` of the dataclass ``cls``.

    Each option's flag, type, help and shown default come from the field
    (:func:`ase_bptt.runs.config.option`); its value reaches the command under
    the field's name (``nested__name`` with ``nested``, e.g. the pretraining
    settings inside ``FinetuneConfig.pretrain``), None when not given, so the
    config's own default applies (:func:`recipe_config`). A field whose None
    means "off" takes ``off`` too.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    params: list[click.Parameter] = []
    for name in names:
        f = fields[name]
        meta = f.metadata.get("cli")
        if meta is None:
            raise TypeError(f"{cls.__name__}.{name} is not a command-line option (see runs.config.option)")
        flag = (flags or {}).get(name) or meta["flag"] or "--" + name.replace("_", "-")
        dest = f"{nested}__{name}" if nested else name
        text = f"{meta['help']}  [default: {shown_default(f)}]"
        hint = hints[name]
        if hint is bool:
            params.append(click.Option([f"{flag}/--no-{flag[2:]}", dest], default=None, help=text))
        elif typing.get_origin(hint) is tuple:
            params.append(click.Option([flag, dest], multiple=True, metavar=meta["metavar"], help=text))
        else:
            kind = _click_type(hint, meta, field_default(f))
            params.append(click.Option([flag, dest], type=kind, default=None, metavar=meta["metavar"], help=text))
    return params


def option_flags(cls: type) -> dict[str, str]:
    """Field name -> flag of every command-line field of ``cls``."""
    return {
        f.name: f.metadata["cli"]["flag"] or "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(cls)
        if "cli" in f.metadata
    }


def recipe_config(factory: Callable[..., Any], cls: type, *, recipe: str, **values: Any) -> Any:
    """A training config from the recipe and the options the user gave (``factory``: ``pretrain_config``
    or ``finetune_config`` of ase_bptt.train.presets); its own checks become one usage error naming the
    option."""
    given: dict[str, Any] = {}
    for key, value in values.items():
        if value is None or value == ():
            continue
        value = None if value == OFF else value
        outer, sep, inner = key.partition("__")
        if sep:
            given.setdefault(outer, {})[inner] = value
        else:
            given[key] = value
    try:
        return factory(recipe, **given)
    except (ValueError, TypeError) as exc:
        from ase_bptt.runs.config import ConfigError

        name = exc.field if isinstance(exc, ConfigError) else None
        flag = option_flags(cls).get(name or "")
        raise click.BadParameter(one_line(exc), param_hint=f"'{flag}'" if flag else None) from None
