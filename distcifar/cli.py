"""The command-line parser every entry point shares (jsonargparse), each of its errors one UsageError line, and the
fixed-width table every command prints its figures in.

YAML values are read as YAML 1.2 does: `1e-3` is a number, only true/false are booleans (`no` stays a string),
and `3:5` is a string. How a UsageError becomes exit code 2 is in errors.py.
"""

from __future__ import annotations

import difflib
import re

import yaml
from jsonargparse import ArgumentParser, set_loader, set_parsing_settings

from distcifar.errors import UsageError, one_line

set_parsing_settings(docstring_parse_attribute_docstrings=True)


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2's core schema where 1.1 surprises: `1e-3` is a float, only true/false are booleans, and integers are
    plain digits (1.1 reads `3:5` as the base-60 number 185)."""


_YAML11_SURPRISES = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int")
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_SURPRISES]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# before the float resolver, which also matches plain digits: the first match wins
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)
set_loader("yaml12", lambda text: yaml.load(text, Loader=_Yaml12Loader), exceptions=(yaml.YAMLError,))


class _Parser(ArgumentParser):
    """jsonargparse, with every error raised as one UsageError line."""

    def error(self, message: str, *args, **kwargs):
        message = one_line(message)
        unknown = re.match(r"unrecognized arguments: (--[\w.-]+)", message)
        if unknown:
            name = unknown.group(1).split("=")[0]
            options = [o for action in self._actions for o in action.option_strings]
            match = difflib.get_close_matches(name, options, n=1)
            message = f"unknown option {name}" + (f" (did you mean {match[0]}?)" if match else "") + "; see --help"
        raise UsageError(message)


def make_parser(prog: str, description: str) -> ArgumentParser:
    return _Parser(prog=prog, description=description, parser_mode="yaml12", exit_on_error=False)


def columns(rows: list[list[str]], align: str, indent: str = "") -> list[str]:
    """Cells as fixed-width lines: each column as wide as its widest cell, left- or right-aligned by align's letter
    for it ('<' or '>'); the last column is not padded."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(align))]
    return [
        indent + "  ".join(format(cell, f"{how}{width}") for cell, how, width in zip(row, align, widths)).rstrip()
        for row in rows
    ]
