"""The line budgets stated in the README's file tree hold: each file, the paper's path, and all the
Python outside tests/ and workshop/ (non-blank lines), so the code's size never drifts unnoticed;
the paper's path keeps at least a quarter of its lines for comments and docstrings; and no line of
that Python is over 100 characters; and its modules import each other without a cycle."""
import ast
import glob
import io
import os
import re
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_PATH = ["rediff.py", "model.py", "train_stage1.py", "train_stage2.py", "sample.py"]
TOTALS = {"paper path": PAPER_PATH, "all Python": None}  # None: every .py outside tests/, workshop/
MIN_COMMENT_SHARE = 0.25
MAX_COLUMNS = 100  # the style's longest line, outside tests/ and workshop/
TREE_LINE = re.compile(r"^(\S+(?: \S+)?)\s{2,}(\d+)\s{2,}\S")  # name, budget, description


def non_blank_lines(path: str) -> int:
    with open(os.path.join(ROOT, path)) as f:
        return sum(1 for line in f if line.strip())


def all_python() -> list[str]:
    paths = glob.glob("**/*.py", root_dir=ROOT, recursive=True)
    return sorted(p for p in paths if not p.startswith(("tests/", "workshop/", ".venv/", "out/",
                                                          "runs/")))


def readme_budgets() -> dict[str, int]:
    """{name: budget} from the first code block after the README's "## Files" heading."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("\n## Files", 1)[1]
    block = section.split("```", 2)[1]
    return {m.group(1): int(m.group(2)) for line in block.splitlines() if (m := TREE_LINE.match(line))}


def test_every_budget_holds():
    budgets = readme_budgets()
    assert set(TOTALS) <= set(budgets), f"the README's file tree lacks {set(TOTALS) - set(budgets)}"
    over = []
    for name, budget in budgets.items():
        if name in TOTALS:
            files = TOTALS[name] or all_python()
            count = sum(non_blank_lines(p) for p in files)
        else:
            assert os.path.exists(os.path.join(ROOT, name)), f"README file tree: {name} does not exist"
            count = non_blank_lines(name)
        if count > budget:
            over.append(f"{name}: {count} non-blank lines, budget {budget}")
    assert not over, "over budget (shorten the code, or raise the README's budget with a reason): " \
        + "; ".join(over)


def test_lines_are_at_most_100_characters():
    long = [f"{path}:{number}" for path in all_python()
            for number, line in enumerate(open(os.path.join(ROOT, path)), 1)
            if len(line.rstrip("\n")) > MAX_COLUMNS]
    assert not long, f"lines over {MAX_COLUMNS} characters (wrap them): {', '.join(long[:20])}"


def test_every_top_level_python_file_has_a_budget():
    budgets = readme_budgets()
    top = [p for p in all_python() if "/" not in p or p.startswith(("data/", "tools/"))]
    missing = [p for p in top if p not in budgets and not p.endswith(("__init__.py", "conftest.py"))]
    assert not missing, f"files without a line budget in the README's file tree: {missing}"


def comment_lines(path: str) -> tuple[int, int]:
    """(non-blank lines that are comments or docstrings, non-blank lines) of one file."""
    with open(os.path.join(ROOT, path)) as f:
        source = f.read()
    filled = {i for i, line in enumerate(source.splitlines(), 1) if line.strip()}
    notes = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            notes.add(token.start[0])
        elif token.type == tokenize.STRING and token.string.lstrip("rbuf").startswith('"""'):
            notes.update(range(token.start[0], token.end[0] + 1))
    return len(notes & filled), len(filled)


def test_the_paper_path_is_a_quarter_comments():
    notes, lines = map(sum, zip(*(comment_lines(p) for p in PAPER_PATH)))
    assert notes >= MIN_COMMENT_SHARE * lines, \
        f"the paper path has {notes} comment or docstring lines of {lines}: under a quarter"


def test_comment_count_by_hand(tmp_path):
    (tmp_path / "x.py").write_text('"""doc\nmore"""\n\nx = 1  # note\ny = "no"\n# alone\n')
    assert comment_lines(str(tmp_path / "x.py")) == (4, 5)  # an absolute path: os.path.join keeps it


def project_imports(path: str, modules: set) -> set:
    """The project modules `path` imports anywhere in it (inside functions too)."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names & modules


def import_cycle(graph: dict) -> list:
    """One cycle of the directed graph {module: imported modules}, or [] when it has none."""
    state = {}  # module -> "open" while on the path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return []
    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return []


def test_import_cycle_by_hand():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_modules_import_each_other_without_a_cycle():
    """No module outside tests/ and workshop/ imports itself through others (distributed.py imports
    model.py, so model.py never imports distributed.py; sample.py imports llada_v.py, so llada_v.py
    never imports sample.py): the import graph has no cycle."""
    paths = {p[:-3].replace("/", ".").removesuffix(".__init__"): p for p in all_python()}
    graph = {name: project_imports(path, set(paths)) - {name} for name, path in paths.items()}
    assert "distributed" in graph["train_stage1"] and "model" in graph["distributed"]
    assert not (cycle := import_cycle(graph)), f"import cycle: {' -> '.join(cycle)}"
