"""MkDocs hook: the CLI reference page, rendered at build time from the Typer app itself.

``docs/reference.md`` holds a marker line; this hook replaces it with every command's usage, help text,
arguments, options (grouped by their ``--help`` panels, each row the one ``--help`` prints) and examples, read
from ``typer.main.get_command``. So the reference cannot drift from ``--help``, and a command someone adds
appears without touching the docs. (``mkdocs-click`` refuses Typer's commands: Typer bundles its own Click.)
"""

from __future__ import annotations

import html
import inspect
import re

MARKER = "<!-- cli-reference -->"
SKIPPED = {"help", "install_completion", "show_completion"}  # the same on every command, or shell setup


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render_reference())


def render_reference() -> str:
    """Markdown for ``simmim`` and each of its commands, in the order ``simmim --help`` lists them."""
    import typer.main

    from simmim_cli.cli import app

    group = typer.main.get_command(app)
    return "\n\n".join(render_tree(group, group.make_context("simmim", [], resilient_parsing=True), "simmim"))


def render_tree(command, context, path: str) -> list[str]:
    """This command's section, then its subcommands' (and theirs, should a command group ever be added)."""
    subcommands = getattr(command, "commands", {})
    parts = [render_command(command, context, path, is_group=bool(subcommands))]
    for name, sub in subcommands.items():
        if not sub.hidden:
            sub_context = sub.make_context(f"{path} {name}", [], parent=context, resilient_parsing=True)
            parts += render_tree(sub, sub_context, f"{path} {name}")
    return parts


def render_command(command, context, path: str, is_group: bool = False) -> str:
    lines = [f"## `{path}`", "", text(inspect.cleandoc(command.help or "")), ""]
    lines += ["```text", f"{path} {' '.join(command.collect_usage_pieces(context))}", "```", ""]
    panels: dict[str, list[str]] = {}
    for param in command.get_params(context):
        if param.hidden or param.name in SKIPPED:
            continue
        record = param.get_help_record(context)  # the very row --help prints (None: --help shows nothing)
        if record is None:
            continue
        names, help_text = record
        help_text, default = split_default(help_text or "")
        panel = "Arguments" if param.param_type_name == "argument" else (
            getattr(param, "rich_help_panel", None) or "Options")
        panels.setdefault(panel, []).append(f"| {code_names(names)} | {cell(default)} | {cell(help_text)} |")
    for panel, rows in sorted(panels.items(), key=lambda item: item[0] != "Arguments"):  # arguments first
        lines += [f"**{panel}**", "", "| | default | description |", "|---|---|---|", *rows, ""]
    if is_group:
        lines += ["| command | what it does |", "|---|---|"]
        lines += [f"| [`{path} {name}`](#{anchor(f'{path} {name}')}) | {cell(sub.get_short_help_str(limit=300))} |"
                  for name, sub in command.commands.items() if not sub.hidden]
        lines.append("")
    if command.epilog:
        lines += ["```text", command.epilog.replace("\n\n", "\n").strip(), "```", ""]
    return "\n".join(lines)


def anchor(path: str) -> str:
    """The id MkDocs gives the heading of ``path``: ``simmim make-shards`` → ``simmim-make-shards``."""
    return path.replace(" ", "-")


def split_default(help_text: str) -> tuple[str, str]:
    """``'Seed.  [default: 0]'`` → ``('Seed.', '0')``; a trailing ``[required]`` → ``'required'``."""
    match = re.search(r"\s*\[(?:default: (?P<default>.*)|required)\]$", help_text)
    if not match:
        return help_text, ""
    return help_text[:match.start()], match.group("default") or "required"


def code_names(names: str) -> str:
    """``'--shuffle / --no-shuffle'`` → each name as code; a metavar (``--seed <int>``) stays with its name."""
    return " / ".join(f"`{part.strip()}`" for part in names.split(" / "))


def text(value: str) -> str:
    """Help text as Markdown: Rich's escaped brackets unescaped, HTML and Markdown specials escaped."""
    value = html.escape(value.replace("\\[", "["), quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", value)


def cell(value: str) -> str:
    return " ".join(text(value).split())
