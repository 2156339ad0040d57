"""cli.py: one dataclass config per script, exposed with argparse (dashes on the command line, help on every flag)."""
from __future__ import annotations

import argparse
import dataclasses
import json


def option(default, help: str, **kw):
    """A config field with its --help text (list defaults are copied per instance)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default and keeps the script docstring's own line breaks."""


def parse_config(cls, argv=None, description: str = "", presets: dict | None = None):
    """Build `cls` from the command line. A preset (e.g. --tiny) sets many defaults at once; explicit flags win."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=_HelpFormatter)
    for name, preset in (presets or {}).items():
        parser.add_argument(f"--{name}", action="store_true", help=preset["help"])
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help strings with %
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif f.metadata.get("nargs"):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            parser.add_argument(flag, type=f.metadata["type"], nargs=f.metadata["nargs"], default=default,
                                help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(flag, type=kind, default=f.default, help=help_text,
                                choices=f.metadata.get("choices"))
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    explicit = _explicit_flags(argv)
    for name, preset in (presets or {}).items():
        if getattr(args, name):
            for key, value in preset["values"].items():
                if key not in explicit:
                    values[key] = value
    return cls(**values)


def _explicit_flags(argv) -> set:
    import sys
    argv = sys.argv[1:] if argv is None else argv
    names = set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            names.add(name.removeprefix("no-").replace("-", "_"))
    return names


def show_config(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=1, sort_keys=True)
