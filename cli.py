"""cli.py: one dataclass config per script, exposed with argparse (dashes, help on every flag).

The rule every script follows: an error the user caused (a flag's value, a path, a file's content,
a checkpoint of the wrong kind, an endpoint that never answers) ends the command with one line on
stderr naming the input and the fix, and exit status 2 for a bad flag value (as argparse), else 1.
Tracebacks are for bugs. Values are checked when parsed (option's bounds); each script's
`__main__` runs main() through run_main(), which turns user errors into that one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import operator
import os
import sys

BAD_ARGUMENT_STATUS = 2   # argparse's exit status for a bad command line; UsageError's too
USER_ERROR_STATUS = 1     # a bad file, checkpoint or endpoint
INTERRUPTED_STATUS = 130  # Ctrl-C, as a shell reports it
BOUNDS = {"at_least": operator.ge, "more_than": operator.gt, "at_most": operator.le,
          "less_than": operator.lt}  # option()'s bounds; a message names one as "at least", ...
# (module, class) of the project's exceptions whose message names the input and the fix. A class
# is only looked up when its module was imported (it cannot have been raised otherwise).
USER_ERRORS = (("data.loaders", "DataError"), ("experts", "ExpertError"),
               ("llada_v", "CheckpointMismatch"))
ONE_FILE, SHARDED = ".safetensors", ".dcp"  # what a training script's --out means, by its ending
DCP_META = "meta.json"                      # the file that marks a DCP folder (distributed.py)


def option(default, help: str, **kw):
    """A config field with its --help text (list defaults are copied per instance). Bounds, checked
    when the flag is parsed (each element of a list): at_least, more_than, at_most, less_than; also
    choices, nargs, type."""
    metadata = {"help": help, **kw}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class UsageError(SystemExit):
    """A bad flag value found after parsing (e.g. one that does not fit the checkpoint): run_main()
    prints the message and exits with status 2, as argparse does. Uncaught elsewhere it acts as
    SystemExit(message)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default and keeps the script docstring's own line breaks."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the flag and what is wrong), not the whole usage block."""

    def error(self, message):
        self.exit(BAD_ARGUMENT_STATUS,
                  f"{self.prog}: error: {message} (see python {self.prog} --help)\n")


def _bounded(kind, bounds: dict):
    """An argparse type= for `kind` (int, float or str) that also enforces option's `bounds`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        for name, bound in bounds.items():
            if not BOUNDS[name](value, bound):
                words = name.replace("_", " ")
                raise argparse.ArgumentTypeError(f"must be {words} {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def parse_config(cls, argv=None, description: str = "", presets: dict | None = None):
    """Build `cls` from the command line. A preset (e.g. --tiny) sets many defaults at once;
    explicit flags win. The program's name: the script's path from the repository root
    (tools/eval.py, also under python -m tools.eval), or its file name outside it."""
    prog = os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(os.path.abspath(__file__)))
    prog = os.path.basename(sys.argv[0]) if prog.startswith(".") else prog
    parser = _Parser(prog=prog, description=description, formatter_class=_HelpFormatter)
    for name, preset in (presets or {}).items():
        parser.add_argument(f"--{name}", action="store_true", help=preset["help"])
    own = vars(cls).get("__annotations__", {})  # a config's own flags first, then inherited ones
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        bounds = {k: v for k, v in f.metadata.items() if k in BOUNDS}
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
            continue
        name = f.type if isinstance(f.type, str) else f.type.__name__
        kind = f.metadata.get("type") or {"int": int, "float": float}.get(name, str)
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        parser.add_argument(flag, type=_bounded(kind, bounds), default=default, help=help_text,
                            nargs=f.metadata.get("nargs"), choices=f.metadata.get("choices"))
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    explicit = {arg[2:].split("=", 1)[0].removeprefix("no-").replace("-", "_")  # flags typed
                for arg in (sys.argv[1:] if argv is None else argv) if arg.startswith("--")}
    for name, preset in (presets or {}).items():
        if getattr(args, name):
            values.update({k: v for k, v in preset["values"].items() if k not in explicit})
    return cls(**values)


def show_config(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=1, sort_keys=True)

# ------------------------------------------------------------------------------------------------
# Checks of user input after parsing, and the top-level guard


def check_writable(path: str, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: its nearest existing ancestor
    must be a writable folder (the missing folders below it are made when the file is written)."""
    if not path:
        return
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, DCP_META)):
        example = os.path.join(path, "out" + ONE_FILE if flag == "--out" else "out")
        raise UsageError(f"{flag} {path}: is a folder, not a file name; name the file to write, "
                         f"e.g. {example}")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable; choose another path")


def check_checkpoint_out(path: str, sharded: bool, flag: str = "--out") -> None:
    """The one meaning of a training script's --out: NAME.safetensors is one checkpoint file,
    NAME.dcp (or an existing DCP folder) a sharded folder (distributed.py). sharded: whether this
    script can write a folder."""
    folder = path.rstrip("/").endswith(SHARDED) or os.path.isfile(os.path.join(path, DCP_META))
    if not path.endswith(ONE_FILE) and not folder:
        raise UsageError(f"{flag} {path}: name the checkpoint NAME{ONE_FILE} (one file)"
                         + (f" or NAME{SHARDED} (a sharded folder)" if sharded else ""))
    if folder and not sharded:
        name = path.rstrip("/").removesuffix(SHARDED) + ONE_FILE
        raise UsageError(f"{flag} {path}: this script writes one file (weights only), not a "
                         f"sharded folder; name it {name}")
    if not folder:
        check_writable(path, flag)


def check_folder_out(path: str, what: str, flag: str = "--out") -> None:
    """An output that is a folder (a Hugging Face export, a run folder): never NAME.safetensors or
    an existing file, and somewhere writable."""
    if path.endswith(ONE_FILE) or os.path.isfile(path):
        raise UsageError(f"{flag} {path}: {what} is a folder, not one file; give a folder name "
                         f"(NAME{ONE_FILE} is a checkpoint file of the training scripts)")
    check_writable(os.path.join(path, "out"), flag)


def run_main(main, argv=None):
    """Run a script's main(argv) as a command: a user error ends with one line on stderr and a
    non-zero exit status (UsageError: 2; SystemExit(message), the project's user-error exceptions,
    a path the system refused: 1; Ctrl-C: 130). Any other exception is a bug: its traceback
    shows."""
    try:
        main(argv)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); checkpoints are written whole or not at all", file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS)
    except (SystemExit, Exception) as err:
        user_errors = tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS
                            if module in sys.modules)
        if isinstance(err, SystemExit) and not (err.code is None or isinstance(err.code, int)):
            message = str(err.code)
        elif isinstance(err, OSError) and err.filename is not None:
            message = f"{err.filename}: {err.strerror or err}; check the path and its permissions"
        elif isinstance(err, user_errors):
            message = str(err)
        else:
            raise
        print(message if message.startswith("error") else f"error: {message}", file=sys.stderr)
        sys.exit(BAD_ARGUMENT_STATUS if isinstance(err, UsageError) else USER_ERROR_STATUS)
