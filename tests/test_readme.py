"""tests/test_readme.py: the README and its docs say what the code does: each Python command of a
```bash block names a script that exists and only flags its --help lists; every relative link, every
file of the README's tree and every function of its paper-to-code table exists; the README stays a
guide (at most 250 lines)."""
import argparse
import ast
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = "README.md"
DOCS = [README, "docs/toy_world.md", "docs/speed.md", "docs/findings.md", "docs/parallel.md"]
MAX_README_LINES = 250
PYTHONS = {"python", "python3"}


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def bash_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks, one per logical line (a trailing backslash continues)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        lines = block.replace("\\\n", " ").splitlines()
        commands += [" ".join(line.split()) for line in lines if line.strip()]
    return commands


def python_call(command: str):
    """(target, flags) of a command that runs one of the repository's scripts: target is a path
    (`python X.py`, `torchrun ... X.py`) or a module (`python -m tools.X`); None otherwise."""
    words = shlex.split(command, comments=True)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the command
        words = words[1:]
    if not words:
        return None
    if os.path.basename(words[0]) in PYTHONS and len(words) > 1:
        if words[1] == "-m":
            module = words[2]
            top = module.split(".")[0]
            if not (os.path.exists(os.path.join(ROOT, top))
                    or os.path.exists(os.path.join(ROOT, top + ".py"))):
                return None  # a module from elsewhere (pytest, pip)
            target, rest = module, words[3:]
        else:
            target, rest = words[1], words[2:]
    elif words[0] == "torchrun":
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if not scripts:
            return None
        target, rest = words[scripts[0]], words[scripts[0] + 1:]
    else:
        return None
    return target, [w.split("=", 1)[0] for w in rest if w.startswith("--")]


def target_file(target: str) -> str:
    return target if target.endswith(".py") else target.replace(".", "/") + ".py"


def calls() -> list[tuple[str, str, str, list[str]]]:
    """(doc, command, target, flags) of every Python command of every doc."""
    found = []
    for doc in DOCS:
        for command in bash_commands(read(doc)):
            call = python_call(command)
            if call is not None:
                found.append((doc, command, *call))
    return found


# ------------------------------------------------------------------------------------------------
# What each script's --help lists: its parser's option strings, read in one subprocess that runs
# each script as `python X.py --help` would, and stops it when it parses its command line.


class _Parsed(BaseException):
    """Raised in place of parsing: carries the parser's option strings (BaseException: no
    script's `except Exception` or cli.run_main catches it)."""


def print_option_strings() -> None:
    """For each target in sys.argv[1:]: {target: option strings, or "error: ..."} as JSON."""
    def capture(parser, args=None, namespace=None):
        raise _Parsed(sorted(parser._option_string_actions))

    argparse.ArgumentParser.parse_known_args = capture
    targets, found, path = sys.argv[1:], {}, list(sys.path)
    for target in targets:
        sys.argv = [target, "--help"]
        first = os.path.dirname(os.path.abspath(target)) if target.endswith(".py") else ROOT
        sys.path[:] = [first] + [p for p in path if p not in ("", ROOT)]
        try:
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            found[target] = "error: it never parsed a command line"
        except _Parsed as parsed:
            found[target] = parsed.args[0]
        except BaseException as err:  # noqa: BLE001 (an import error, an early exit: report it)
            found[target] = f"error: {type(err).__name__}: {err}"
    sys.path[:] = path
    print(json.dumps(found))


def option_strings(targets: list[str]) -> dict:
    code = "import tests.test_readme as t; t.print_option_strings()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, *targets], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------


def test_readme_is_a_guide():
    n_lines = len(read(README).splitlines())
    assert n_lines <= MAX_README_LINES, f"README.md has {n_lines} lines, at most {MAX_README_LINES}"


def test_commands_name_scripts_that_exist():
    missing = [f"{doc}: `{command}`: no file {target_file(target)}"
               for doc, command, target, _ in calls()
               if not os.path.isfile(os.path.join(ROOT, target_file(target)))]
    assert not missing, "\n".join(missing)


def test_commands_use_only_listed_flags():
    found = [c for c in calls() if os.path.isfile(os.path.join(ROOT, target_file(c[2])))]
    listed = option_strings(sorted({target for _, _, target, _ in found}))
    problems = []
    for doc, command, target, flags in found:
        known = listed[target]
        if isinstance(known, str):
            problems.append(f"{doc}: `{command}`: {target} --help failed: {known}")
            continue
        unknown = [flag for flag in flags if flag not in known]
        if unknown:
            problems.append(f"{doc}: `{command}`: {target} --help does not list "
                            f"{', '.join(unknown)}")
    assert not problems, "\n".join(problems)


def test_relative_links_exist():
    missing = []
    for doc in DOCS:
        for link in re.findall(r"\]\(([^)\s]+)\)", read(doc)):
            if re.match(r"^[a-z]+:", link) or link.startswith("#"):
                continue  # a web address or an anchor of the same page
            path = os.path.join(ROOT, os.path.dirname(doc), link.split("#")[0])
            if not os.path.exists(path):
                missing.append(f"{doc}: ({link})")
    assert not missing, "missing link targets:\n" + "\n".join(missing)


def test_file_tree_exists():
    tree = re.search(r"^## Files\n.*?^```\n(.*?)^```", read(README), flags=re.S | re.M)
    assert tree, "README.md: no file tree (a ``` block under ## Files)"
    names = [line.split()[0] for line in tree.group(1).splitlines() if line.strip()]
    totals = ("paper", "all")  # the budget lines "paper path" and "all Python" (tests/test_budgets.py)
    missing = [name for name in names
               if name not in totals and not os.path.exists(os.path.join(ROOT, name))]
    assert not missing, f"README.md's file tree names files that do not exist: {missing}"


def defined_names(path: str) -> set:
    """Top-level functions, classes and assigned names of a Python file, read without importing."""
    tree = ast.parse(read(path))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_paper_table_names_exist():
    """`module.name` in the paper-to-code table: module.py (or data/module.py) defines name."""
    text = read(README)
    table = text[text.index("| Paper | Code |"):]
    table = table[:table.index("\n\n")]
    missing = []
    for code in re.findall(r"`([A-Za-z_][\w.]*)(?:\(|`)", table):
        *module, name = code.split(".")
        path = "/".join(module) + ".py"
        if not module or name == "py" or not os.path.isfile(os.path.join(ROOT, path)):
            continue  # a file name (sample.py) or a flag: checked elsewhere
        if name not in defined_names(path):
            missing.append(f"{code}: {path} defines no {name}")
    assert not missing, "README.md's paper-to-code table:\n" + "\n".join(missing)
