"""The command line shared by every entry point: its parser, and usage errors as exit code 2.

Every entry point (train, evaluate, benchmark, plot) runs its main() through `entry_point`, which
turns a UsageError into one `error: ...` line on stderr and exit code 2 (a RunFailed: exit code 1). Parsing uses jsonargparse;
YAML values are read as YAML 1.2 does: `1e-3` is a number, and only true/false are booleans (`no`
stays a string).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys

import yaml
from jsonargparse import ArgumentParser, set_loader, set_parsing_settings

set_parsing_settings(docstring_parse_attribute_docstrings=True)


class UsageError(Exception):
    """The user asked for something that cannot be done as given (exit code 2)."""


class RunFailed(Exception):
    """The run met a fault it can name (divergence, a full disk); nothing good was lost (exit code 1)."""


EXIT_CODE_FILE = "DISTCIFAR_EXIT_CODE_FILE"


def entry_point(main):
    """Run main(); a UsageError becomes one line on stderr and exit code 2, a RunFailed exit code 1.

    accelerate launch exits with 1 whatever its workers' codes, so the main process (RANK 0 or no
    launcher) also writes its code to the file $DISTCIFAR_EXIT_CODE_FILE names, when set
    (slurm/train.sh sets it and exits with that code)."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UsageError, RunFailed) as err:
            if str(err):  # empty: another rank follows the main process's error, which says it once
                print(f"error: {err}", file=sys.stderr, flush=True)
            code = 2 if isinstance(err, UsageError) else 1
            path = os.environ.get(EXIT_CODE_FILE)
            if path and os.environ.get("RANK", "0") == "0":
                try:
                    with open(path, "w") as file:
                        file.write(f"{code}\n")
                except OSError:  # not on the launching host: the launcher's code stands
                    pass
            sys.exit(code)

    return run


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2's core schema where 1.1 surprises: `1e-3` is a float, only true/false are booleans."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
set_loader("yaml12", lambda text: yaml.load(text, Loader=_Yaml12Loader), exceptions=(yaml.YAMLError,))


class _Parser(ArgumentParser):
    """jsonargparse, with every error raised as one UsageError line."""

    def error(self, message: str, *args, **kwargs):
        message = " ".join(str(message).split())
        unknown = re.match(r"unrecognized arguments: (--[\w.-]+)", message)
        if unknown:
            name = unknown.group(1).split("=")[0]
            options = [o for action in self._actions for o in action.option_strings]
            match = difflib.get_close_matches(name, options, n=1)
            message = f"unknown option {name}" + (f" (did you mean {match[0]}?)" if match else "") + "; see --help"
        raise UsageError(message)


def make_parser(prog: str, description: str) -> ArgumentParser:
    return _Parser(prog=prog, description=description, parser_mode="yaml12", exit_on_error=False)
