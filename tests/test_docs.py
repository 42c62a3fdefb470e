"""The documentation stays true to the code: the options its examples use exist, its runnable examples run, the
site builds with ``mkdocs build --strict`` (its CLI reference generated from the app), the README's links resolve.

The rule for runnable examples (also in docs/contributing.md): a ```console block right after the line
``<!-- test: run -->``; its ``$ simmim ...`` lines run in order, each page's blocks in one temporary folder that
holds ``photos/`` (small JPEGs in two class sub-folders); the other lines are expected output; an ``error:`` line
among them means exit code 2 is expected, else 0.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer.main
from PIL import Image

from simmim_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN_MARKER = "<!-- test: run -->"
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "text"}
# `simmim ...`, `python -m simmim_cli ...`, `torchrun ... -m simmim_cli ...`: what follows is the command line
COMMAND_START = re.compile(r"(?:^|(?<=[\s;&|(]))(?:simmim|-m simmim_cli)\s+")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "COLUMNS": "200", "NO_MKDOCS_2_WARNING": "1"}


# ---------------------------------------------------------------------------------------------- reading pages


def code_blocks(text: str) -> list[tuple[str, list[str], bool]]:
    """(language, lines, marked to run) of each fenced block."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        marked = index > 0 and lines[index - 1].strip() == RUN_MARKER
        blocks.append((fence.group(1), lines[index + 1:end], marked))
        index = end + 1
    return blocks


def joined(lines: list[str]) -> list[str]:
    """Shell lines with their backslash continuations joined."""
    result, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            result.append(pending + line)
            pending = ""
    return result


def command_lines(text: str) -> list[str]:
    """Every simmim command line a page shows: in shell code blocks (a console block's `$` lines only) and in
    inline code outside them."""
    found, prose = [], text
    for language, lines, _ in code_blocks(text):
        if language not in SHELL_LANGUAGES:
            continue
        for line in joined(lines):
            if language == "console" and not line.startswith("$ "):
                continue
            line = line[:comment_start(line)]  # `# ... simmim --gpus 8 ...` in a comment is prose
            found += [line[m.start():] for m in COMMAND_START.finditer(line)]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):  # a span that is a command (not a message mentioning one)
        if span.startswith("simmim ") or " -m simmim_cli " in span:
            found.append(span[COMMAND_START.search(span).start():])
    return found


def comment_start(line: str) -> int:
    """Where a shell comment starts (a `#` after a space, outside quotes), or the line's length."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return index
    return len(line)


def tokens(command_line: str) -> list[str]:
    """The arguments after `simmim`, up to a comment or the next shell command."""
    start = COMMAND_START.search(command_line)
    rest = command_line[start.end():] if start else command_line
    try:
        words = shlex.split(rest, comments=True)
    except ValueError:  # an unbalanced quote in prose: split on spaces
        words = rest.split()
    for index, word in enumerate(words):
        if word in ("&&", "||", ";", "|", ">", "2>&1"):
            return words[:index]
    return words


# ---------------------------------------------------------------------------------------------- the app


def option_names() -> dict[str, set[str]]:
    """Each command's option names, from the Typer app: "" is `simmim` itself, "pretrain" `simmim pretrain`."""
    names = {}

    def visit(command, path: str) -> None:
        names[path] = {opt for param in command.params if param.param_type_name == "option"
                       for opt in [*param.opts, *param.secondary_opts]} | {"--help", "-h"}
        for name, sub in getattr(command, "commands", {}).items():  # a command group's commands
            visit(sub, f"{path} {name}".strip())

    visit(typer.main.get_command(app), "")
    return names


def unknown_options(command_line: str, names: dict[str, set[str]]) -> list[str]:
    words, command = tokens(command_line), ""
    problems = []
    for word in words:
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            if option.startswith("--") and option not in names[command]:
                problems.append(f"{option} is not an option of `{f'simmim {command}'.strip()}`")
        elif f"{command} {word}".strip() in names:
            command = f"{command} {word}".strip()
        elif command == "":  # the first word that is not an option should have been a command
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                return problems  # a placeholder (COMMAND, ...): nothing more to check
            return [f"`simmim {word}` is not a command"]
    return problems


def test_every_option_in_the_docs_exists():
    names = option_names()
    problems, checked = [], 0
    for page in PAGES:
        for line in command_lines(page.read_text()):
            checked += 1
            problems += [f"{page.relative_to(ROOT)}: {problem}  in: {line.strip()}"
                         for problem in unknown_options(line, names)]
    assert checked > 50, "the docs' command lines were not found"
    assert not problems, "\n".join(problems)


def test_the_option_check_catches_a_renamed_option():
    names = option_names()
    assert unknown_options("simmim pretrain --data shards/ --img-size 192  # comment --nothing", names) == []
    assert unknown_options("simmim pretrain --data shards/ --image-size 192", names) == [
        "--image-size is not an option of `simmim pretrain`"]
    assert unknown_options("torchrun --nproc-per-node 8 -m simmim_cli pretrain --gpu 8", names) == [
        "--gpu is not an option of `simmim pretrain`"]
    assert unknown_options("simmim pretrian --data x", names) == ["`simmim pretrian` is not a command"]
    assert unknown_options("simmim --debug COMMAND --anything", names) == []
    page = ("see `simmim knn --gpus 8` and\n```bash\nsimmim export --onnx \\\n  --int8  # simmim --no-such\n"
            "sbatch job.sh   # each runs simmim pretrain --gpus 8\n```\n")
    assert [tokens(line) for line in command_lines(page)] == [["export", "--onnx", "--int8"], ["knn", "--gpus", "8"]]


def test_the_files_the_docs_name_exist():
    missing = []
    for page in PAGES:
        for path in re.findall(r"\b((?:recipes|benchmarks)/[\w./-]*\w\.(?:yaml|sh|py))\b", page.read_text()):
            if not (ROOT / path).is_file():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "\n".join(missing)


def test_the_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?!https?://)[^)#\s]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 10
    assert [link for link in links if not (ROOT / link).exists()] == []
    assert "pip install -e . && simmim pretrain --demo" in readme
    assert 'pip install -e ".[test]" && pytest' in readme  # .ci/run runs this very command


def error_message_heads() -> dict[str, str]:
    """``file:line`` → the first words of each one-line error the code raises: the first piece of its message's
    literal text at least 12 characters long, cut at ``;``, ``:`` and brackets (the rest is filled in)."""
    trees = {path: ast.parse(path.read_text()) for path in sorted((ROOT / "simmim_cli").rglob("*.py"))}
    error_classes = {"SimmimError"}
    for _ in range(3):  # subclasses of subclasses
        error_classes |= {node.name for tree in trees.values() for node in ast.walk(tree)
                          if isinstance(node, ast.ClassDef)
                          and any(getattr(base, "id", None) in error_classes for base in node.bases)}
    heads = {}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in error_classes and node.args:
                pieces = [piece.strip() for literal in ast.walk(node.args[0])
                          if isinstance(literal, ast.Constant) and isinstance(literal.value, str)
                          for piece in re.split(r"[;:()]", literal.value)]
                pieces = [piece for piece in pieces if len(piece) >= 12]
                if pieces:
                    heads[f"{path.relative_to(ROOT)}:{node.lineno}"] = " ".join(pieces[0].split())
    return heads


def test_every_error_message_is_in_troubleshooting():
    """A user who searches the troubleshooting page for the start of an error finds what it means and the fix."""
    page = " ".join((ROOT / "docs" / "troubleshooting.md").read_text().split())
    heads = error_message_heads()
    assert len(heads) > 100 and "simmim_cli/masking.py" in " ".join(heads)
    missing = [f"{where}: {head}" for where, head in heads.items() if head not in page]
    assert not missing, "add these errors to docs/troubleshooting.md:\n" + "\n".join(missing)


# ---------------------------------------------------------------------------------------------- runnable examples


def runnable_blocks(page: Path) -> list[list[str]]:
    return [joined(lines) for language, lines, marked in code_blocks(page.read_text()) if marked]


def test_run_markers_sit_on_console_blocks():
    for page in PAGES:
        lines = page.read_text().splitlines()
        for index, line in enumerate(lines):
            if line.strip() == RUN_MARKER:
                assert lines[index + 1].startswith("```console"), f"{page.name}:{index + 1}: not on a console block"


RUNNABLE_PAGES = [page for page in PAGES if runnable_blocks(page)]
SLOW_PAGES = {"embeddings.md", "getting-started.md", "mixing.md", "troubleshooting.md"}  # more than 5 s each here


def make_photos(folder: Path) -> None:
    """Two classes of 16 small JPEGs: noise, and noise with white stripes."""
    rng = np.random.default_rng(0)
    for label in ("noise", "stripes"):
        (folder / label).mkdir(parents=True)
        for index in range(16):
            image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
            if label == "stripes":
                image[::6] = 255
            Image.fromarray(image).save(folder / label / f"{index:02d}.jpg", quality=90)


@pytest.mark.parametrize("page", [pytest.param(page, marks=pytest.mark.slow) if page.name in SLOW_PAGES else page
                                  for page in RUNNABLE_PAGES], ids=lambda page: page.name)
def test_runnable_examples_run(page, tmp_path):
    make_photos(tmp_path / "photos")
    for block in runnable_blocks(page):
        commands: list[tuple[str, list[str]]] = []
        for line in block:
            if line.startswith("$ "):
                commands.append((line[2:], []))
            elif line.strip():
                commands[-1][1].append(line.strip())
        for command, expected in commands:
            words = shlex.split(command, comments=True)
            assert words[0] == "simmim", f"{page.name}: only simmim commands run: {command}"
            result = subprocess.run([sys.executable, "-m", "simmim_cli", *words[1:]], cwd=tmp_path, env=ENV,
                                    capture_output=True, text=True, timeout=300)
            output = result.stdout + result.stderr
            wanted = 2 if any(line.startswith("error:") for line in expected) else 0
            assert result.returncode == wanted, f"{page.name}: `{command}` exited {result.returncode}:\n{output}"
            for line in expected:
                assert " ".join(line.split()) in " ".join(output.split()), f"{page.name}: `{command}`:\n{output}"


def test_some_examples_are_runnable():
    assert len(RUNNABLE_PAGES) >= 2


# ---------------------------------------------------------------------------------------------- the site


def test_the_site_builds_strictly_with_the_generated_reference(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (site / "reference" / "index.html").read_text()
    for command, names in option_names().items():
        assert f"<code>simmim {command}".strip() in reference
        for name in names - {"--help", "-h", "--install-completion", "--show-completion"}:  # not rendered
            assert re.search(f"<code>{re.escape(name)}[ <]", reference), f"`simmim {command} {name}` is not in it"
