"""The user documentation stays true: README.md and every docs/*.md.

* Every command in their code blocks (fenced, or indented shell lines) and every complete inline one parses against
  the real CLI.
* Their `python -c` lines compile and call existing arguments; Python blocks run (here, or in the test a doc names).
* docs/CONFIGURATION.md's tables list exactly the constructor arguments (and defaults) of the classes;
  docs/PUBLISHED.md's preset table lists exactly the released configurations with their parameter counts.
* Local links and anchors resolve, and no document or source file names a file that is not in the repository.

* `diffusion-pl fit | validate | test ...` lines (also behind `VAR=value`, `srun`, `torchrun ... $(which diffusion-pl)`,
  `torchrun ... -m diffusion_pl.cli`, `python -m diffusion_pl.cli`) run in-process with `--print_config` appended: the
  config file and every override must parse (data need not exist; nothing is instantiated).
* `diffusion-pl sample | evaluate | sweep ...` lines are parsed with the parser `diffusion_pl.cli.main` builds for the
  command (captured with jsonargparse.capture_parser, nothing runs); `--arch` / `--classifier_arch` must name released
  presets and `--data_class` a DataModule.
* `diffusion-pl demo ...` is run by `make demo` and checked by the tests of the demo; here it is only parsed when the
  command is registered.
So a renamed option, config key or preset makes this test fail.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXTS = {doc: doc.read_text() for doc in DOCS}
CONFIGURATION = ROOT / "docs" / "CONFIGURATION.md"
PUBLISHED = ROOT / "docs" / "PUBLISHED.md"
# Docs whose ```python blocks another test executes (in one namespace, in order): doc -> that test file.
EXECUTED_ELSEWHERE = {"docs/PYTHON_API.md": "tests/diffusion/test_diffusion_docs.py",
                      "docs/NOTEBOOK.md": "tests/test_notebook_doc.py"}  # runs it in an empty folder


def _name(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()

LIGHTNING_COMMANDS = ("fit", "validate", "test")
# Commands whose runs are checked by the tests of the demo (`make demo` -> `diffusion-pl demo`), not here.
COVERED_BY_DEMO_TESTS = ("demo",)

_COMMAND_WORDS = "fit|validate|test|sample|evaluate|sweep|demo"
# "diffusion-pl fit ..." but not a message it prints ("diffusion-pl fit: error: ...")
_MENTION = re.compile(rf"(?:\bdiffusion-pl|\bdiffusion_pl\.cli)\s+(?:{_COMMAND_WORDS})\b(?!:)")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


# ------------------------------------------------------------------------------------------------ extraction
_PROGRAMS = ("diffusion-pl", "python", "python3", "torchrun", "srun", "make", "pip")


def _indented_command(lines: list[str], i: int) -> int:
    """Indentation of an indented code block of shell commands starting at line i (after a blank line), else 0."""
    indent = len(lines[i]) - len(lines[i].lstrip(" "))
    first = lines[i].split(maxsplit=1)[0] if lines[i].strip() else ""
    if indent < 4 or (i > 0 and lines[i - 1].strip()) or first.rsplit("/", 1)[-1] not in _PROGRAMS:
        return 0
    return indent


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number of the first body line) of every fenced block, and of every indented block of
    shell commands (language "")."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^\s*```(\w*)\s*$", lines[i])
        indent = 0 if match else _indented_command(lines, i)
        if match:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((match.group(1), "\n".join(body), start + 1))
        elif indent:
            start, body = i, []
            while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip(" ")) >= indent:
                body.append(lines[i][indent:])
                i += 1
            blocks.append(("", "\n".join(body), start + 1))
            continue
        i += 1
    return blocks


def logical_lines(body: str, first_line: int) -> list[tuple[int, str]]:
    """Shell lines with backslash continuations joined, as (line number, text)."""
    out, pending, start = [], "", None
    for offset, line in enumerate(body.splitlines()):
        if start is None:
            start = first_line + offset
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((start, pending + stripped))
        pending, start = "", None
    if pending:
        out.append((start, pending))
    return out


def diffusion_pl_args(line: str) -> list[str] | None:
    """The arguments given to diffusion-pl by a shell line, or None if the line does not run diffusion-pl."""
    line = line.replace("$(which diffusion-pl)", "diffusion-pl")
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    while tokens and _ENV.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None

    def is_program(token: str) -> bool:
        return token == "diffusion-pl" or token.endswith("/diffusion-pl")

    head = tokens[0]
    if is_program(head):
        return tokens[1:]
    if re.fullmatch(r"(.*/)?python3?", head) and tokens[1:3] == ["-m", "diffusion_pl.cli"]:
        return tokens[3:]
    if head in ("srun", "torchrun"):
        for i, token in enumerate(tokens[1:], start=1):
            if is_program(token):
                return tokens[i + 1 :]
            if token == "-m" and tokens[i + 1 : i + 2] == ["diffusion_pl.cli"]:
                return tokens[i + 2 :]
    return None


def inline_commands(text: str) -> list[tuple[int, str, list[str]]]:
    """Complete commands written as inline code in the prose (with an option, not elided with "...")."""
    commands, in_block = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            continue
        for span in re.findall(r"`([^`]+)`", line):
            args = diffusion_pl_args(span)
            if args and args[0].endswith(":"):
                continue  # a message diffusion-pl prints ("diffusion-pl fit: error: ..."), not a command
            if args and "..." not in span and any(a.startswith("--") for a in args):
                commands.append((number, span, args))
    return commands


def doc_commands(text: str) -> list[tuple[int, str, list[str]]]:
    """(line, text, args) of every diffusion-pl command in a document's code blocks, then of the inline ones."""
    commands = []
    for lang, body, first in code_blocks(text):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for number, line in logical_lines(body, first):
            args = diffusion_pl_args(line)
            if args and args[0].endswith(":"):
                continue  # a message diffusion-pl prints, not a command
            if args is not None:
                commands.append((number, line.strip(), args))
            elif _MENTION.search(line.split("#", 1)[0]):
                commands.append((number, line.strip(), None))  # a launcher form this test does not understand
    return commands + inline_commands(text)


COMMANDS = [(doc, *command) for doc in DOCS for command in doc_commands(TEXTS[doc])]


def _id(command: tuple[Path, int, str, list[str] | None]) -> str:
    doc, number, _, args = command
    words = [a for a in (args or []) if not a.startswith("-")][:1]
    return f"{doc.stem}-L{number}-{'-'.join(words) or 'unparsed'}"


# ------------------------------------------------------------------------------------------------ running the CLI
def _run_main(args: list[str]) -> tuple[int, str, str]:
    from diffusion_pl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    code = 0 if code is None else code
    return (code if isinstance(code, int) else 1), out.getvalue(), err.getvalue()


def _command_parser(command: str):
    """The jsonargparse parser diffusion-pl builds for an extra command, captured without running it."""
    from jsonargparse import CLI, capture_parser

    from diffusion_pl import cli

    try:
        return capture_parser(lambda: cli.main([command]))
    except Exception:  # main() may wrap errors; build it the way main() does from the registry
        module_name, function_name = cli.EXTRA_COMMANDS[command].split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        return capture_parser(lambda: CLI(function, args=[], prog=f"diffusion-pl {command}"))


def _check_semantics(command: str, namespace) -> None:
    from diffusion_pl.models import RELEASED_CONFIGS

    for key in ("arch", "classifier_arch"):
        value = getattr(namespace, key, None)
        if value is not None and not value.endswith((".yaml", ".yml")):
            assert value in RELEASED_CONFIGS, f"--{key} {value!r} is not a released preset: {sorted(RELEASED_CONFIGS)}"
    data_class = getattr(namespace, "data_class", None)
    if data_class is not None:
        module_name, _, name = (
            data_class.rpartition(".") if "." in data_class else ("diffusion_pl.data", "", data_class)
        )
        assert hasattr(importlib.import_module(module_name), name), f"--data_class {data_class!r} does not exist"
        data_args = getattr(namespace, "data_args", None) or {}
        signature = inspect.signature(getattr(importlib.import_module(module_name), name))
        unknown = set(data_args) - set(signature.parameters)
        assert not unknown, f"--data_args keys {sorted(unknown)} are not {name} arguments"


# ------------------------------------------------------------------------------------------------ tests
def test_docs_have_commands_of_every_kind():
    kinds = {args[0] for _, _, _, args in COMMANDS if args}
    assert {"fit", "validate", "test", "sample", "evaluate", "sweep", "demo"} <= kinds, kinds
    launchers = {line.split()[0] for _, _, line, args in COMMANDS if args}
    assert {"diffusion-pl", "torchrun", "srun"} <= launchers, launchers
    readme_kinds = {args[0] for doc, _, _, args in COMMANDS if args and doc.name == "README.md"}
    assert {"fit", "sample", "evaluate"} <= readme_kinds, readme_kinds


@pytest.mark.parametrize("command", COMMANDS, ids=[_id(c) for c in COMMANDS])
def test_doc_command_parses(command, monkeypatch):
    doc, number, line, args = command
    where = f"{_name(doc)} line {number}"
    assert args is not None, f"{where}: cannot tell how this line runs diffusion-pl: {line}"
    monkeypatch.chdir(ROOT)  # config paths in the docs are relative to the checkout
    _check_command(where, line, args)


_HELP_EXAMPLE = re.compile(rf"\bdiffusion-pl\s+(?:{_COMMAND_WORDS})\b(?!:)[^`)\n]*")


@pytest.mark.parametrize("command", [None, *LIGHTNING_COMMANDS, "sample", "evaluate", "sweep", "demo"])
def test_commands_shown_in_help_texts_parse(command, monkeypatch):
    """The examples `diffusion-pl --help` and each command's --help show (e.g. "(diffusion-pl fit --config ...)")."""
    code, out, err = _run_main(["--help"] if command is None else [command, "--help"])
    assert code == 0 and out.strip(), f"diffusion-pl {command or ''} --help failed:\n{err[-2000:]}"
    monkeypatch.chdir(ROOT)
    examples = [e for line in out.splitlines() if not line.lstrip().startswith("usage:")
                for e in _HELP_EXAMPLE.findall(line)]  # fmt: skip
    for example in examples:
        args = diffusion_pl_args(example.strip())
        _check_command(f"`diffusion-pl {command or ''} --help`", example, args)


def _check_command(where: str, line: str, args: list[str]) -> None:
    """Parse one diffusion-pl command line against the real CLI without running it (see the module docstring)."""
    assert args, f"{where}: diffusion-pl without a command: {line}"
    assert "$" not in " ".join(args), f"{where}: unexpanded shell variable in {line}"
    name, rest = args[0], args[1:]

    if name in LIGHTNING_COMMANDS:
        asks_help = any(a in ("--help", "-h") or (a.startswith("--") and a.endswith(".help")) for a in rest)
        extra = [] if asks_help or "--print_config" in rest else ["--print_config"]
        code, out, err = _run_main(args + extra)
        assert code == 0, f"{where} does not parse:\n{line}\n{err[-3000:]}"
        if extra or "--print_config" in rest:
            config = yaml.safe_load(out[out.index("seed_everything") :] if "seed_everything" in out else out)
            assert isinstance(config, dict) and "model" in config and "trainer" in config, out[:500]
        return

    from diffusion_pl import cli

    if name in COVERED_BY_DEMO_TESTS and name not in cli.EXTRA_COMMANDS:
        pytest.skip(f"`diffusion-pl {name}` is run by `make demo` and checked by the tests of the demo")
    assert name in cli.EXTRA_COMMANDS, f"{where}: unknown command {name!r} in {line}"
    parser = _command_parser(name)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            namespace = parser.parse_args(rest)
        except SystemExit as exit_:
            assert exit_.code in (0, None), f"{where} does not parse:\n{line}\n{err.getvalue()[-3000:]}"
            return  # --help
    _check_semantics(name, namespace)


def _make_commands() -> list[tuple[str, list[str]]]:
    """(where, tokens after `make`) of every `make TARGET ...` in a code block or inline code of the docs."""
    found = []
    for doc in DOCS:
        spans = [line for _, body, first in code_blocks(TEXTS[doc]) for _, line in logical_lines(body, first)]
        spans += re.findall(r"`(make [^`]+)`", TEXTS[doc])
        for span in spans:
            tokens = shlex.split(span, comments=True) if span.strip() else []
            if tokens[:1] == ["make"] and len(tokens) > 1:
                found.append((f"{_name(doc)}: {span.strip()}", tokens[1:]))
    return found


def test_make_lines_name_real_targets_and_options():
    """`make demo DEMO_OUT=... DEMO_ARGS="..."` in the docs: the target exists, the variables are the Makefile's and
    DEMO_ARGS are options `diffusion-pl demo` accepts."""
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, flags=re.M))
    commands = _make_commands()
    assert any(tokens[0] == "demo" for _, tokens in commands) and any(tokens[0] == "test" for _, tokens in commands)
    for where, tokens in commands:
        names = [t for t in tokens if "=" not in t]
        assert names and set(names) <= targets, f"{where}: no such make target (the Makefile has {sorted(targets)})"
        for variable, _, value in (t.partition("=") for t in tokens if "=" in t):
            assert f"$({variable})" in makefile, f"{where}: the Makefile does not use {variable}"
            if variable == "DEMO_ARGS":
                parser = _command_parser("demo")
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    parser.parse_args(["--out_dir", "x", *shlex.split(value)])


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_mentions_are_commands(doc):
    """Sanity check of the extraction: every code line naming a diffusion-pl command was extracted as one."""
    extracted = {number for d, number, _, _ in COMMANDS if d == doc}
    for lang, body, first in code_blocks(TEXTS[doc]):
        for number, line in logical_lines(body, first):
            if _MENTION.search(line.split("#", 1)[0]) and lang in ("", "bash", "sh", "shell", "console"):
                assert number in extracted, f"{_name(doc)} line {number} was not checked: {line}"


PYTHON_DOCS = [doc for doc in DOCS if any(lang == "python" for lang, _, _ in code_blocks(TEXTS[doc]))]


@pytest.mark.parametrize("doc", PYTHON_DOCS, ids=_name)
def test_python_examples_run(doc):
    """Each doc's ```python blocks run, in order, in one namespace; or the test the doc is mapped to runs them."""
    if _name(doc) in EXECUTED_ELSEWHERE:
        runner = ROOT / EXECUTED_ELSEWHERE[_name(doc)]
        assert runner.is_file() and doc.name in runner.read_text(), f"{runner} does not execute {_name(doc)}"
        return
    import torch

    torch.manual_seed(0)
    namespace: dict = {}
    for lang, body, first in code_blocks(TEXTS[doc]):
        if lang == "python":
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(body, f"{_name(doc)}:{first}", "exec"), namespace)


def test_python_one_liners_are_valid():
    """`python -c "..."` lines compile, their imports resolve and their calls use existing keyword arguments."""
    import ast

    found = 0
    for doc in DOCS:
        for _lang, body, first in code_blocks(TEXTS[doc]):
            for number, line in logical_lines(body, first):
                tokens = shlex.split(line, comments=True) if line.strip() else []
                if len(tokens) < 3 or not re.fullmatch(r"(.*/)?python3?", tokens[0]) or tokens[1] != "-c":
                    continue
                found += 1
                where = f"{_name(doc)}:{number}"
                tree = ast.parse(tokens[2], filename=where)
                namespace: dict = {}
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        exec(compile(ast.Module(body=[node], type_ignores=[]), where, "exec"), namespace)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in namespace:
                        parameters = inspect.signature(namespace[node.func.id]).parameters
                        unknown = {k.arg for k in node.keywords} - set(parameters)
                        assert not unknown, f"{where}: {node.func.id} has no arguments {sorted(unknown)}"
    assert found, "no doc has a python -c line (the ImageNet prepare step of docs/RECIPES.md)"


# ------------------------------------------------------------------------------------------------ reference tables
def _table_classes():
    from diffusion_pl.data import CIFAR10DataModule, ImageNet64DataModule, MNIST5kDataModule
    from diffusion_pl.lightning import DiffusionModule, GuidedSampler, NoisyClassifierModule
    from diffusion_pl.lightning.evaluation_callback import SampleQualityEvaluation

    return [DiffusionModule, NoisyClassifierModule, GuidedSampler, SampleQualityEvaluation, MNIST5kDataModule,
            CIFAR10DataModule, ImageNet64DataModule]  # fmt: skip


def _section(doc: Path, heading: str) -> str:
    """The text under the first heading that starts with `heading` (e.g. '### DiffusionModule'), to the next one."""
    match = re.search(rf"^{re.escape(heading)}\b.*?$(.*?)(?=^#)", TEXTS[doc] + "\n#", flags=re.M | re.S)
    assert match, f"{_name(doc)} has no '{heading}' section"
    return match.group(1)


def _table_rows(text: str) -> list[list[str]]:
    """The cells of the table rows whose first cell is `code`."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            rows.append(cells)
    return rows


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _config_options(cls) -> dict:
    """The options of ``cls`` in a config and their defaults, in the order of ``--help``, as jsonargparse reads the
    constructor (following ``**kwargs`` into a base class's signature, as for the DataModules' loader options)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "options")
    parameters = inspect.signature(cls.__init__).parameters
    return {name: parameters[name].default if name in parameters else default
            for name, default in parser.get_defaults().options.as_dict().items()}  # fmt: skip


@pytest.mark.parametrize("cls", _table_classes(), ids=lambda c: c.__name__)
def test_config_table_matches_signature(cls):
    cells = _table_rows(_section(CONFIGURATION, f"### {cls.__name__}"))
    rows = {row[0].strip("`"): row[2].strip("`") for row in cells}
    options = _config_options(cls)
    assert list(rows) == list(options), (
        f"CONFIGURATION.md table of {cls.__name__} lists {list(rows)}, the config takes {list(options)}"
    )
    for name, default in options.items():
        shown = yaml.safe_load(rows[name])
        assert shown == _plain(default), f"{cls.__name__}.{name}: CONFIGURATION.md says {rows[name]!r}, code {default}"


def test_published_presets_are_the_released_configs_with_their_parameter_counts():
    from diffusion_pl.models import RELEASED_CONFIGS

    rows = _table_rows(_section(PUBLISHED, "## Released networks"))
    listed = {cells[0].strip("`"): int(cells[-1].replace(",", "")) for cells in rows}
    assert list(listed) == list(RELEASED_CONFIGS), f"PUBLISHED.md lists {list(listed)}, code {list(RELEASED_CONFIGS)}"
    for name, count in listed.items():
        expected = RELEASED_CONFIGS[name][2]
        assert count == expected, f"PUBLISHED.md: {name} has {count:,} parameters, the code {expected:,}"


# ------------------------------------------------------------------------------------------------ links
def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = TEXTS[path] if path in TEXTS else path.read_text()
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_local_links_and_anchors_resolve(doc):
    text = TEXTS[doc]
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{_name(doc)} links to {path}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{_name(doc)} links to {target}: no such heading in {linked.name}"
    for config in set(re.findall(r"configs/[\w.]+\.yaml", text)):
        assert (ROOT / config).is_file(), f"{_name(doc)} names {config}, which does not exist"


def _repository_files() -> list[Path]:
    """What users and maintainers read: docs, configs, the package, benchmarks, the build files (not test data)."""
    files = [*DOCS, ROOT / "BENCHMARKS.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder, pattern in (("diffusion_pl", "*.py"), ("configs", "*.yaml"), ("benchmarks", "*"), ("tests", "*.py")):
        files += [p for p in sorted((ROOT / folder).rglob(pattern)) if p.is_file() and "__pycache__" not in p.parts]
    return files


def test_no_file_points_outside_the_repository():
    """Every Markdown file a doc or source file names is in the repository, and none points at a folder beside it."""
    markdown = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    for path in _repository_files():
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        where = path.relative_to(ROOT).as_posix()
        assert "../shared" not in text, f"{where} points at ../shared, which is not part of the repository"
        if path.parent.name == "tests" or "tests" in path.relative_to(ROOT).parts:
            continue  # tests name temporary .md files they write
        for name in re.findall(r"(?<![\w/.-])([\w.-]+/)*([\w-]+\.md)\b", text):
            assert name[1] in markdown, f"{where} names {name[1]}, which is not in the repository"


def _same_file_references(row: str) -> list[tuple[str, str]]:
    """(file, test) of every ``…::test_x`` in a table row, the file being the last ``file.py::`` before it."""
    found, path = [], None
    for match in re.finditer(r"((?:[\w/]+/)?test_\w+\.py)::|`…::(test_\w+)", row):
        if match.group(1):
            path = match.group(1)
        else:
            assert path, f"…::{match.group(2)} follows no file::test in its row: {row[:80]}"
            found.append((path, match.group(2)))
    return found


def test_troubleshooting_names_tests_that_exist():
    """docs/TROUBLESHOOTING.md names, for each case, the test that keeps it so: every file::test it names exists
    (abridged names, ``…test_x``, must be a test function somewhere under tests/; ``…::test_x`` is in the file the
    same table row named before it)."""
    text = (ROOT / "docs" / "TROUBLESHOOTING.md").read_text()
    sources = {p: p.read_text() for p in (ROOT / "tests").rglob("test_*.py")}
    full = re.findall(r"`…?((?:[\w/]+/)?test_\w+\.py)::(test_\w+)", text)
    abridged = re.findall(r"`…(test_\w+)\b(?!\.py)", text)
    same_file = [(path, name) for row in text.splitlines() for path, name in _same_file_references(row)]
    assert len(full) > 20 and abridged and same_file
    full += same_file
    for path, name in full:
        matches = [src for p, src in sources.items() if p.as_posix().endswith("tests/" + path) or p.name == path]
        assert matches, f"{path} (named in TROUBLESHOOTING.md) does not exist"
        assert any(re.search(rf"^def {name}\(", src, re.M) for src in matches), f"{path}::{name} does not exist"
    for name in abridged:
        assert any(re.search(rf"^def {name}\(", src, re.M) for src in sources.values()), f"no test {name}"
