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
    """Each field's help text from the dataclass's source: the comment lines just above the field, then the
    comment beside it (or on its default's continuation line)."""
    docs: dict[str, str] = {}
    above: list[str] = []
    last = None
    for line in inspect.getsource(cls).splitlines():
        comment = re.match(r"\s+#\s*(.*)$", line)
        if comment:
            above.append(comment.group(1).strip())
            continue
        field = re.match(r"\s+(\w+):[^#]*?(?:#\s*(.+))?$", line)
        if field and not line.strip().startswith(('"', "'")):
            last = field.group(1)
            docs[last] = " ".join([*above, field.group(2) or ""]).strip()
        elif last and not docs[last] and "#" in line:  # `field: T = (` with the comment on the next line
            docs[last] = line.split("#", 1)[1].strip()
        above = []
    return {name: text for name, text in docs.items() if text}


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
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a YAML value ({problem}): quote it, or give list items as separate words"
        ) from None


def list_item_hint(hint: Any) -> Any | None:
    """The item type of a list field (list[str], or a union holding one), else None."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    for option in options:
        if typing.get_origin(option) is list:
            return (typing.get_args(option) or (Any,))[0]
    return None


def list_flag_value(texts: list[str], hint: Any) -> Any:
    """A list field's words: `--gradients.modules '*lora_A*' '*lora_B*'`, a comma list `a,b`, a YAML list
    `[a, b]`, or one of the field's other values (`auto`, `null`). Items are taken as text (no YAML: `*` is a
    glob here, not an alias)."""
    item = list_item_hint(hint)
    if len(texts) == 1:
        text = texts[0].strip()
        if text.startswith("["):
            return flag_value(text, list)
        if text in ("null", "none", "None"):
            return None
        choices = [v for o in typing.get_args(hint) if typing.get_origin(o) is Literal for v in typing.get_args(o)]
        if text in choices:
            return text
        texts = [part for part in text.split(",") if part.strip()]
    return [word.strip() if item is str else flag_value(word, item) for word in texts]


class ListFlag(argparse.Action):
    """Collects a list field's words (nargs="+") into its config value."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list_flag_value(list(values), self.hint))


def add_config_flags(
    parser: argparse.ArgumentParser, sections: list[str], aliases: dict[str, str] | None = None
) -> None:
    """`--section.field` for every field of `sections` (plus short `aliases`: {"--workers": "build.workers"})."""
    by_key = {key: flag for flag, key in (aliases or {}).items()}
    for section in sections:
        cls = typing.get_type_hints(Config)[section]
        if not dataclasses.is_dataclass(cls):  # a top-level setting (device): --device
            default = Config.__dataclass_fields__[section].default
            text = f"{field_docs(Config).get(section, '')} (default: {default!r})".replace("%", "%%")  # argparse's %
            parser.add_argument(f"--{section}", dest=f"{SEP}{section}", default=argparse.SUPPRESS,
                                type=lambda text, hint=cls: flag_value(text, hint), metavar=_metavar(cls),
                                help=text)  # fmt: skip
            continue
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        group = parser.add_argument_group(f"config section '{section}' (overrides the YAML file)")
        for field in dataclasses.fields(cls):
            key = f"{section}{SEP}{yaml_key(field)}"
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            names = [f"--{key}"] + ([by_key[key]] if key in by_key else [])
            text = f"{docs.get(field.name, '')} (default: {default!r})".strip().replace("%", "%%")  # argparse's %
            hint = hints[field.name]
            if list_item_hint(hint) is not None:  # words, a comma list or a YAML list
                action = group.add_argument(*names, dest=key, default=argparse.SUPPRESS, nargs="+", action=ListFlag,
                                            metavar="ITEM", help=text)  # fmt: skip
                action.hint = hint
                continue
            group.add_argument(
                *names,
                dest=key,
                default=argparse.SUPPRESS,
                metavar=_metavar(hint),
                type=lambda text, hint=hint: flag_value(text, hint),
                help=text,
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
