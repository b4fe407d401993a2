"""MkDocs hook: the reference pages that are generated from the code, so they cannot drift from it.

A page writes a marker on a line of its own, `<!-- generated: NAME -->`, and the build replaces it with NAME:
  cli      every `tdastore` command's --help, from the argparse parser the CLI runs
  config   every config field (YAML key and flag, type, default, the comment beside it), from the dataclasses
  methods  the method table (each method's operator per path), from tdastore/methods.py
  http     the query service's endpoints and request / response fields, from its FastAPI app's OpenAPI
  readme   the README (the overview) as the home page
tests/test_docs.py calls these functions too (every command, field and public name is in the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from pathlib import Path
from types import SimpleNamespace

MARKER = re.compile(r"^<!-- generated: (\w+) -->$", re.M)  # a line of its own (not one quoted in text)


def on_page_markdown(markdown: str, page=None, config=None, files=None) -> str:
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from tdastore.cli import make_parser

    parser = make_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    return dict(actions[0].choices)


def cli_reference() -> str:
    """Each command's usage, description and own options; the config flags every command shares are listed
    once, on the config page (each field is `--section.field`)."""
    out = []
    for name, parser in subcommands().items():
        groups = parser._action_groups  # noqa: SLF001 - argparse has no public way to format a subset
        sections = [g.title.split("'")[1] for g in groups if g.title and g.title.startswith("config section")]
        parser._action_groups = [g for g in groups if not (g.title or "").startswith("config section")]  # noqa: SLF001
        try:
            text = parser.format_help()
        finally:
            parser._action_groups = groups  # noqa: SLF001
        out.append(f"## tdastore {name}\n\n```text\n{text.rstrip()}\n```\n")
        if sections:
            links = ", ".join(f"[`{s}`](config.md#{s})" for s in sections)
            out.append(f"Config flags (`--section.field VALUE`, overriding `--config`): {links}.")
            short = [
                f"`{alias}` (`{action.option_strings[0]}`)"
                for group in groups
                if (group.title or "").startswith("config section")
                for action in group._group_actions  # noqa: SLF001
                for alias in action.option_strings[1:]
            ]
            out.append(f"Short forms: {', '.join(short)}.\n" if short else "")
    return "\n".join(out)


def type_name(hint) -> str:
    text = str(hint) if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))
    return text.replace("typing.", "").replace("NoneType", "None").replace("|", "\\|")


def config_reference() -> str:
    """One table per section: key (as YAML and as a flag), type, default, what it does."""
    from tdastore.cli.flags import field_docs
    from tdastore.config import Config, yaml_key

    out = []
    hints = typing.get_type_hints(Config)
    top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(hints[f.name])]
    sections = [f for f in dataclasses.fields(Config) if f not in top]
    out.append("## top level\n\n| key / flag | type | default | what it does |\n|---|---|---|---|")
    for f in top:
        out.append(row(f"{yaml_key(f)}", f"--{yaml_key(f)}", hints[f.name], f, field_docs(Config).get(f.name, "")))
    for section in sections:
        cls = hints[section.name]
        docs = field_docs(cls)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ and "(" not in cls.__doc__[:40] else ""
        out.append(f"\n## {section.name}\n\n{doc}\n\n| key / flag | type | default | what it does |\n|---|---|---|---|")
        class_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = yaml_key(f)
            out.append(row(key, f"--{section.name}.{key}", class_hints[f.name], f, docs.get(f.name, "")))
    return "\n".join(out)


def row(key: str, flag: str, hint, field: dataclasses.Field, doc: str) -> str:
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = "(required)"
    doc = doc.replace("|", "\\|")
    shown = json.dumps(default) if not isinstance(default, str) or default != "(required)" else default
    return f"| `{key}`<br>`{flag}` | `{type_name(hint)}` | `{shown}` | {doc} |"


def method_table() -> str:
    from tdastore.methods import METHODS

    out = ["| method | projected path operator | exact path operator | notes |", "|---|---|---|---|"]
    for m in METHODS.values():
        notes = [
            text
            for flag, text in (
                (m.normalise, "unit-normalised gradients"),
                (m.normalise_metric, "unit-normalised in the operator's metric"),
                (m.normalised_store, "projected path: a store built with `gradients.normalizer`"),
                (m.learning_rate, "times the training learning rate"),
                (m.further_training, "scores a gold standard's further training (`tdastore metagrad`)"),
            )
            if flag
        ]
        out.append(f"| `{m.name}` | {code(m.projected)} | {code(m.exact)} | {'; '.join(notes)} |")
    return "\n".join(out)


def code(name: str | None) -> str:
    return f"`{name}`" if name else "-"


EXAMPLE_STORES = {  # what GET /methods reports for two stores, so the schema is the one a real store gets
    "a tabular regression store (diabetes)": {
        "methods": ["grad_dot", "grad_cos", "if_gn", "lissa", "datainf"],
        "rows": 353,
        "kind": "regression",
        "features": ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"],
        "target": "target",
        "measurement": "loss",
    },
    "a causal LM store": {
        "methods": ["grad_dot", "grad_cos", "if_gn", "kfac", "ekfac"],
        "rows": 340,
        "kind": "causal_lm",
        "text": True,
        "measurement": "loss",
    },
}


def openapi(meta: dict) -> dict:
    """The OpenAPI document a replica serves at /openapi.json for a store described by `meta`."""
    from tdastore.serve import build_api

    return build_api(SimpleNamespace(meta=meta, token_sha256=None)).openapi()


def http_reference() -> str:
    out = []
    for what, meta in EXAMPLE_STORES.items():
        spec = openapi(meta)
        out.append(f"## Endpoints, for {what}\n\n| method | path | what it does |\n|---|---|---|")
        for path, verbs in spec["paths"].items():
            for verb, op in verbs.items():
                out.append(f"| `{verb.upper()}` | `{path}` | {op.get('summary', '')} |")
        schemas = spec["components"]["schemas"]
        for name in ("QueryRequest", "QueryResponse", "Ranked", "Hit"):
            if name not in schemas:
                continue
            schema = schemas[name]
            out.append(f"\n### `{name}` ({what})\n\n| field | type | required | default | description |")
            out.append("|---|---|---|---|---|")
            required = set(schema.get("required", []))
            for field, prop in schema.get("properties", {}).items():
                kind = json_type(prop).replace("|", "\\|")
                default = json.dumps(prop["default"]) if "default" in prop else ""
                text = prop.get("description", "").replace("|", "\\|")
                out.append(f"| `{field}` | {kind} | {'yes' if field in required else ''} | {default} | {text} |")
        out.append("")
    return "\n".join(out)


def json_type(prop: dict) -> str:
    if "$ref" in prop:
        return f"`{prop['$ref'].rsplit('/', 1)[-1]}`"
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    if "anyOf" in prop:
        return " or ".join(json_type(p) for p in prop["anyOf"])
    if prop.get("type") == "array":
        bound = [f"{k.split('I')[0]} {prop[k]}" for k in ("minItems", "maxItems") if k in prop]
        return f"list of {json_type(prop.get('items', {}))}" + (f" ({', '.join(bound)})" if bound else "")
    bound = [f"{k} {prop[k]:g}" for k in ("minimum", "maximum", "maxLength") if k in prop]
    return f"`{prop.get('type', 'object')}`" + (f" ({', '.join(bound)})" if bound else "")


def readme() -> str:
    """The README (the project's overview) as the site's home page, its links into docs/ made site-relative."""
    root = Path(__file__).parents[1]
    text = (root / "README.md").read_text().split("\n", 1)[1]  # the site has its own title
    return text.replace("](docs/", "](")


GENERATORS = {
    "readme": readme,
    "cli": cli_reference,
    "config": config_reference,
    "methods": method_table,
    "http": http_reference,
}
