"""Command-line flags generated from the typed config: every field of a section is `--section.field`.

One source of truth: the dataclasses of tdastore/config.py (their defaults, types and the comment beside each
field become the flag's help). A flag's text is read as YAML for lists, numbers and null (so `--projection.factors
[8,8]` and `--attribution.cg_tol 1e-6` work) and as plain text for string fields; load_config validates it like
a YAML value. Flags that are not given stay out of the overrides, so a YAML file's values survive.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import types
import typing
from functools import cache
from typing import Any, Literal, Union

import yaml

from tdastore.config import Config, yaml_key

SEP = "."


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The comment beside each field in the dataclass's source (its help text)."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if match:
            docs[match.group(1)] = match.group(2).strip()
    return docs


def _is_text(hint: Any) -> bool:
    """Whether a field takes plain text (a string, or a choice among strings), optionally null."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return all(_is_text(h) for h in typing.get_args(hint) if h is not type(None))
    if origin is Literal:
        return all(isinstance(v, str) for v in typing.get_args(hint))
    return hint is str


def flag_value(text: str, hint: Any) -> Any:
    """A flag's text as the config value it stands for (validated later by load_config)."""
    if _is_text(hint):
        return None if text in ("null", "none", "None") else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # load_config names the key and the type it wants


def add_config_flags(
    parser: argparse.ArgumentParser, sections: list[str], aliases: dict[str, str] | None = None
) -> None:
    """`--section.field` for every field of `sections` (plus short `aliases`: {"--workers": "build.workers"})."""
    by_key = {key: flag for flag, key in (aliases or {}).items()}
    for section in sections:
        cls = typing.get_type_hints(Config)[section]
        if not dataclasses.is_dataclass(cls):  # a top-level setting (device): --device
            default = Config.__dataclass_fields__[section].default
            parser.add_argument(f"--{section}", dest=f"{SEP}{section}", default=argparse.SUPPRESS,
                                type=lambda text, hint=cls: flag_value(text, hint), metavar=_metavar(cls),
                                help=f"{field_docs(Config).get(section, '')} (default: {default!r})")  # fmt: skip
            continue
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        group = parser.add_argument_group(f"config section '{section}' (overrides the YAML file)")
        for field in dataclasses.fields(cls):
            key = f"{section}{SEP}{yaml_key(field)}"
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            names = [f"--{key}"] + ([by_key[key]] if key in by_key else [])
            group.add_argument(
                *names,
                dest=key,
                default=argparse.SUPPRESS,
                metavar=_metavar(hints[field.name]),
                type=lambda text, hint=hints[field.name]: flag_value(text, hint),
                help=f"{docs.get(field.name, '')} (default: {default!r})".strip(),
            )


def _metavar(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "{" + ",".join(map(str, typing.get_args(hint))) + "}"
    options = [h for h in typing.get_args(hint) if h is not type(None)]
    if options and typing.get_origin(options[0]) is Literal:
        return _metavar(options[0])
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return name.upper()


def config_overrides(args: argparse.Namespace, sections: list[str] | None = None) -> dict:
    """{section: {field: value}} of the config flags given on the command line."""
    overrides: dict = {}
    for key, value in vars(args).items():
        if SEP in key:
            section, name = key.split(SEP, 1)
            if not section and (sections is None or name in sections):  # a top-level setting
                overrides[name] = value
            elif section and (sections is None or section in sections):
                overrides.setdefault(section, {})[name] = value
    return overrides


def suggestion(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """'did you mean ...' for unknown flags, from the parser's own options."""
    known = [option for action in parser._actions for option in action.option_strings]
    parts = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            parts.append(f"'{flag}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        else:
            parts.append(f"'{arg}'")
    return "unrecognized argument(s) " + ", ".join(parts)
