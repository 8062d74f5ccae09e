"""The documentation cannot drift from the code.

1. Every ```python block of README.md and docs/*.md runs: each file's blocks in order, in one
   namespace, with a temporary directory as the working directory (TINYDIFF_DATA passes through).
   Blocks must define every name they use. A block fenced as ```python needs-data is run only when
   TINYDIFF_DATA points at the data sets. Shell commands go in ```bash fences and outputs in
   ```text fences; neither is executed, and no other fence language is allowed.
   A ```text block right after a python block is that block's printed output and is compared
   with what it prints (```text output-varies opts out, for timings).
2. Every flag of every registered command line is documented in docs/ exactly once, with its
   default, in a flag table introduced by ``<!-- flags: COMMAND -->`` (see docs/training.md):

       <!-- flags: examples/train_classifier.py -->
       | flag | default | what it does |
       |---|---|---|
       | `--epochs N` | 4 / 8 / 10 by data set | ... |

   The first cell names the flag (`--limit N`; aliases may follow), the second gives the
   default: a value equal to the parser's, backticked or as the cell's first word (`1e-5` matches
   1e-05), `off` for a store_true flag, `required` for a positional, free text when the parser's
   default is None or SUPPRESS (the text says what happens). Commands sharing flags may share a
   table: ``<!-- flags: A, B -->``. A row naming a flag the parser lacks fails too; flags
   hidden from --help (help=argparse.SUPPRESS) are not required.
   To register a command line, add one line to COMMANDS.
3. Equation and design citations resolve: a file citing "eq. N" names docs/design.md, which has
   an anchor for eq. N; no file cites DESIGN.md (a file outside this repository). A paper's own
   equation numbers are cited with the author right before: "Song eq. 6", "Song et al. 2021,
   eq. 6".
"""
import argparse
import contextlib
import glob
import io
import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DOC_FILES = sorted([os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE_LANGUAGES = {"python", "bash", "text"}

# -- running the snippets ---------------------------------------------------------------------

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<ticks>`{3,})(?P<info>[^`]*)$")


def code_blocks(text, with_gaps=False):
    """[(language, tags, code, first line number of the code)] of the fenced blocks in ``text``;
    with ``with_gaps``, each tuple also says whether only blank lines precede the fence since the
    previous block."""
    blocks, lines, i, last_end = [], text.split("\n"), 0, None
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        info = m.group("info").split()
        lang, tags = (info[0] if info else ""), info[1:]
        start, i = i + 1, i + 1
        while i < len(lines) and not re.match(r"^ {0,3}" + m.group("ticks") + r"\s*$", lines[i]):
            i += 1
        if i == len(lines):
            raise ValueError(f"unclosed ``` fence opened at line {start}")
        body = [ln[len(m.group("indent")):] if ln.startswith(m.group("indent")) else ln
                for ln in lines[start:i]]
        adjacent = last_end is not None and all(not ln.strip() for ln in lines[last_end:start - 1])
        blocks.append((lang, tags, "\n".join(body) + "\n", start + 1)
                      + ((adjacent,) if with_gaps else ()))
        i += 1
        last_end = i
    return blocks


class OutputMismatch(AssertionError):
    """A snippet printed something other than the ```text block that follows it."""


def run_markdown(path, workdir, have_data=None):
    """Execute the ```python blocks of the Markdown file ``path`` in order, in one namespace, with
    ``workdir`` as the working directory. An error names the file and the line in it (the code is
    compiled with the file's own line numbers). A ```text block right after a python block (only
    blank lines between) is its output: what the block prints must equal it, unless the fence
    says ```text output-varies. Returns the namespace."""
    have_data = bool(os.environ.get("TINYDIFF_DATA")) if have_data is None else have_data
    with open(path, encoding="utf-8") as f:
        blocks = code_blocks(f.read(), with_gaps=True)
    namespace = {"__name__": "__doc_snippets__"}
    old_cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for k, (lang, tags, code, line, _) in enumerate(blocks):
            if lang != "python" or ("needs-data" in tags and not have_data):
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile("\n" * (line - 1) + code, path, "exec"), namespace)
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            if nxt and nxt[0] == "text" and nxt[4] and "output-varies" not in nxt[1]:
                if out.getvalue().rstrip() != nxt[2].rstrip():
                    raise OutputMismatch(f"{path}:{line}: the block printed\n{out.getvalue()}"
                                         f"but the text block at line {nxt[3]} says\n{nxt[2]}")
    finally:
        os.chdir(old_cwd)
    return namespace


def _rel(path):
    return os.path.relpath(path, ROOT)


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_snippets_run(path, tmp_path):
    run_markdown(path, str(tmp_path))


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_fences_name_their_language(path):
    with open(path, encoding="utf-8") as f:
        blocks = code_blocks(f.read())
    bad = [(line, lang) for lang, _, _, line, *_ in blocks if lang not in FENCE_LANGUAGES]
    assert not bad, (f"{_rel(path)}: fences without python/bash/text (line, language): {bad}; "
                     "python runs in the tests, bash is for commands, text for output")


def test_runner_runs_blocks_in_order_in_one_namespace(tmp_path):
    doc = tmp_path / "ok.md"
    doc.write_text("Text.\n\n```python\nx = 2\n```\n\n```bash\nexit 1\n```\n\n"
                   "```python\nwith open('out.txt', 'w') as f:\n    f.write(str(x * 21))\n```\n")
    work = tmp_path / "work"
    work.mkdir()
    assert run_markdown(str(doc), str(work))["x"] == 2
    assert (work / "out.txt").read_text() == "42"


def test_runner_fails_on_a_broken_snippet_and_names_the_line(tmp_path):
    doc = tmp_path / "broken.md"
    doc.write_text("# A page\n\n```python\nimport numpy as np\n```\n\n```python\n"
                   "y = np.zeros(3)\nprint(undefined_name)\n```\n")
    with pytest.raises(NameError, match="undefined_name") as err:
        run_markdown(str(doc), str(tmp_path))
    frame = err.traceback[-1]
    assert str(frame.path) == str(doc) and frame.lineno + 1 == 9   # the line in the Markdown file


def test_runner_compares_printed_output_with_the_text_block_after_it(tmp_path):
    good = tmp_path / "good.md"
    good.write_text("```python\nprint(6 * 7)\n```\n\n```text\n42\n```\n\nProse.\n\n"
                    "```text\nnot an output: prose comes between\n```\n\n"
                    "```python\nprint(1)\n```\n```text output-varies\n2\n```\n")
    run_markdown(str(good), str(tmp_path))
    bad = tmp_path / "bad.md"
    bad.write_text("```python\nprint(6 * 9)\n```\n\n```text\n42\n```\n")
    with pytest.raises(OutputMismatch, match="54"):
        run_markdown(str(bad), str(tmp_path))


def test_runner_skips_data_blocks_without_data(tmp_path):
    doc = tmp_path / "data.md"
    doc.write_text("```python needs-data\nraise RuntimeError('needs the data sets')\n```\n")
    run_markdown(str(doc), str(tmp_path), have_data=False)
    with pytest.raises(RuntimeError, match="needs the data sets"):
        run_markdown(str(doc), str(tmp_path), have_data=True)


def test_fence_parser_rejects_an_unclosed_fence():
    with pytest.raises(ValueError, match="unclosed"):
        code_blocks("```python\nx = 1\n")


# -- every flag documented once, with its default ---------------------------------------------

class _Captured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


def script_parser(relpath, call="main", hide=()):
    """A function returning the ArgumentParser of the script ``relpath``: the script is imported
    (with the modules in ``hide`` made unimportable, e.g. a slow optional torch) and ``call([])``
    run until its first ``parse_args``, which is caught before parsing."""
    def get(monkeypatch):
        for name in hide:
            monkeypatch.setitem(sys.modules, name, None)
        spec = importlib.util.spec_from_file_location(f"_doc_{call}_" + re.sub(r"\W", "_", relpath),
                                                      os.path.join(ROOT, relpath))
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setattr(sys, "argv", [relpath])
        spec.loader.exec_module(module)

        def capture(self, *args, **kwargs):
            raise _Captured(self)
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Captured) as got:
            getattr(module, call)([])
        return got.value.parser, module
    return get


def module_parser(module_name, factory):
    """A function returning the parser that ``module_name.factory()`` builds."""
    def get(monkeypatch):
        module = importlib.import_module(module_name)
        return getattr(module, factory)(), module
    return get


# command as named in the docs -> (how to get its parser, and a function of the module returning
# the defaults to expect where the parser's are argparse.SUPPRESS, or None). One line per command
# line; subcommands are checked as "COMMAND SUB" (e.g. "python -m tinydiff train"). The scripts
# that are the shared command line under another name (examples/mnist_uncond.py, mnist_cond.py,
# fashion_mnist.py, cifar10.py, image_folder.py: `tinydiff train`; benchmarks/quality.py:
# `tinydiff evaluate`) have no table of
# their own. train's settings default to SUPPRESS (the preset and recipe decide), so their
# default cells are free text.
COMMANDS = {
    "python -m tinydiff": (module_parser("tinydiff.cli", "build_parser"), None),
    "examples/train_classifier.py": (script_parser("examples/train_classifier.py"), None),
    "examples/make_image_folder.py": (script_parser("examples/make_image_folder.py"), None),
    "benchmarks/bench_scorenet.py": (script_parser("benchmarks/bench_scorenet.py", hide=["torch"]),
                                     None),
}


def subcommands(parser, name):
    """(name, parser) for ``parser`` and, recursively, each of its subcommands ("tinydiff train")."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from subcommands(subparser, f"{name} {sub}")


def flag_tables(paths=None):
    """{command: [(file, line, option names, default cell)]} from every flag table in docs/."""
    tables = {}
    for path in paths or glob.glob(os.path.join(ROOT, "docs", "*.md")):
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for i, line in enumerate(lines):
            m = re.match(r"^<!-- flags: (.+?) -->\s*$", line)
            if not m:
                continue
            commands = [c.strip() for c in m.group(1).split(",")]   # a table several share
            rows = []
            for c in commands:
                tables.setdefault(c, []).append(rows)
            j = i + 1
            while j < len(lines) and not lines[j].startswith("|"):
                j += 1
            j += 2   # the header and the |---| line
            while j < len(lines) and lines[j].startswith("|"):
                cells = [c.strip() for c in lines[j].strip().strip("|").split("|")]
                names = re.findall(r"`([^`]+)`", cells[0])
                names = {n.split()[0] if n.startswith("-") else n.split()[0].lower()
                         for n in names}              # a positional: `RUN` names dest "run"
                rows.append((_rel(path), j + 1, names, cells[1] if len(cells) > 1 else ""))
                j += 1
    return {c: [r for rows in lists for r in rows] for c, lists in tables.items()}


def _documentable(action):
    """Every action but --help, the subcommand switch and hidden ones (help=SUPPRESS: e.g. an old
    name kept as an alias)."""
    return (not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
            and action.help is not argparse.SUPPRESS)


def _option_names(action):
    longs = {o for o in action.option_strings if o.startswith("--")}
    return longs or set(action.option_strings) or {action.dest}


def default_matches(cell, value, action):
    if action.required or (not action.option_strings and action.nargs is None):
        return "required" in cell
    if isinstance(action, argparse._StoreTrueAction):
        return cell.strip("` ").lower() in ("off", "false")
    if value is None:
        return bool(cell)
    m = re.search(r"`([^`]*)`", cell)
    token = m.group(1).strip() if m else (cell.split() or [""])[0]
    if token == str(value):
        return True
    want = list(value) if isinstance(value, (list, tuple)) else [value]
    got = token.replace(",", " ").split()
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if isinstance(w, bool):
            if g.lower() not in (("yes", "true", "on") if w else ("no", "false", "off")):
                return False
        elif not isinstance(w, (int, float)):
            if g != str(w):
                return False
        else:
            try:
                if float(g) != float(w):
                    return False
            except ValueError:
                return False
    return True


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_is_documented_once_with_its_default(command, monkeypatch):
    get_parser, shown_defaults = COMMANDS[command]
    parser, module = get_parser(monkeypatch)
    overrides = shown_defaults(module) if shown_defaults else {}
    tables = flag_tables()
    problems = []
    for name, sub in subcommands(parser, command):
        rows = tables.get(name, [])
        if not rows and not any(_documentable(a) for a in sub._actions):
            continue                                  # e.g. a parser that only has subcommands
        if not rows:
            problems.append(f"{name}: no table introduced by <!-- flags: {name} --> in docs/")
            continue
        known = set()
        for action in sub._actions:
            if not _documentable(action):
                continue
            names = _option_names(action)
            known |= set(action.option_strings) | {action.dest}
            hits = [r for r in rows if r[2] & names]
            label = "/".join(sorted(names))
            if len(hits) != 1:
                problems.append(f"{name} {label}: documented {len(hits)} times "
                                f"({', '.join(f'{f}:{ln}' for f, ln, _, _ in hits) or 'nowhere'})")
                continue
            f, ln, documented, cell = hits[0]
            if documented != names and documented - names - set(action.option_strings):
                problems.append(f"{f}:{ln}: {name} row names {sorted(documented)}, the flag is "
                                f"{sorted(names)}")
            value = overrides.get(action.dest, action.default)
            if value is argparse.SUPPRESS:
                value = None
            if not default_matches(cell, value, action):
                problems.append(f"{f}:{ln}: {name} {label}: default cell {cell!r} does not give "
                                f"the default {value!r}")
        for f, ln, documented, _ in rows:
            if not documented & known:
                problems.append(f"{f}:{ln}: {name} has no flag {sorted(documented)}")
    assert not problems, "\n".join(problems)


def test_flag_tables_name_registered_commands_only():
    known = set()
    for command, (get_parser, _) in COMMANDS.items():
        known.add(command)
    stray = [c for c in flag_tables() if not any(c == k or c.startswith(k + " ") for k in known)]
    assert not stray, f"flag tables for commands not in tests/test_docs.py COMMANDS: {stray}"


def test_flag_checker_catches_a_wrong_default(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text("<!-- flags: demo -->\n| flag | default | what |\n|---|---|---|\n"
                   "| `--lr X` | `1e-3` | learning rate |\n| `--gone` | off | removed flag |\n")
    tables = flag_tables([str(doc)])
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=2e-3)
    (lr,) = [a for a in p._actions if a.dest == "lr"]
    (_, _, names, cell), _ = tables["demo"]
    assert names == {"--lr"} and not default_matches(cell, lr.default, lr)
    assert default_matches("`2e-3`", lr.default, lr)


def test_readme_keeps_the_commands_ci_and_newcomers_run():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    test_command = ('python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && '
                    ".venv/bin/python -m pytest -q")
    assert test_command in readme and test_command in ci
    assert ("python3 -m venv .venv && .venv/bin/pip install -e . && "
            ".venv/bin/python examples/mnist_uncond.py --out runs/mnist") in readme


# -- equation and design references -------------------------------------------------------------

def _source_files():
    for pattern in ("tinydiff/**/*.py", "examples/*.py", "benchmarks/*.py", "benchmarks/*.md",
                    "tests/*.py", "docs/*.md", "README.md"):
        yield from glob.glob(os.path.join(ROOT, pattern), recursive=True)


# "Song eq. 6", "(Song et al. 2021, eq. 6)": a paper's own equation numbers, not design.md's
_PAPER = re.compile(r"^(Song|al\.,?|\d{4},?|paper's|Karras|Ho|Salimans|Vincent)$")


def test_equation_citations_point_at_docs_design():
    with open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8") as f:
        design = f.read()
    anchors = set(re.findall(r'<a id="(eq-\d+)"></a>', design))
    problems = []
    for path in _source_files():
        if path.endswith(os.path.join("tests", "test_docs.py")):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "DESIGN.md" in text:
            problems.append(f"{_rel(path)} cites DESIGN.md, which is not in this repository; cite "
                            "docs/design.md (e.g. 'docs/design.md, the reference model')")
        cited = {n for before, n in re.findall(r"(\S*)\s*\beq\. ?(\d+)", text)
                 if not _PAPER.match(before.lstrip("(["))}
        if cited and "design.md" not in text and not path.endswith("design.md"):
            problems.append(f"{_rel(path)} cites eq. {', '.join(sorted(cited))} without naming "
                            "docs/design.md, where the equations are")
        for n in sorted(cited):
            if f"eq-{n}" not in anchors:
                problems.append(f"{_rel(path)} cites eq. {n}, which docs/design.md does not define "
                                f'(<a id="eq-{n}"></a>)')
    assert not problems, "\n".join(problems)


# pages other branches write; a link to one is checked once it exists
PAGES_IN_FLIGHT = {"docs/conditional.md", "docs/errors.md", "docs/sdes.md"}


def test_relative_links_in_docs_resolve():
    problems = []
    for path in DOC_FILES:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            full = os.path.normpath(os.path.join(os.path.dirname(path), target))
            if not os.path.exists(full) and _rel(full) not in PAGES_IN_FLIGHT:
                problems.append(f"{_rel(path)} links to {target}, which does not exist")
    assert not problems, "\n".join(problems)
