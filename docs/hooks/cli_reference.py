"""MkDocs hook: the line `<!-- cli-reference -->` becomes every command and option of the parser that
`clebench.cli.build_parser()` returns, read at build time, so the page cannot drift from the command line.

Per command: a `## clebench NAME` heading, its description, its usage line and a table of its arguments as
`--help` words them (`-h` included).
"""
from __future__ import annotations

import argparse
import html
import re

from clebench.cli import build_parser

MARKER = "<!-- cli-reference -->"
WIDTH = 80  # usage lines wrap here, whatever the terminal that builds the site


def _html(text: str) -> str:
    """Help text as HTML: escaped, with its `backticked` words as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(parser.prog, width=WIDTH)


def usage(parser: argparse.ArgumentParser) -> str:
    """The parser's usage line, as `--help` prints it at WIDTH columns."""
    formatter = _formatter(parser)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def arguments_table(parser: argparse.ArgumentParser) -> str:
    """An HTML table: each argument's invocation (`--out OUT`, `{ls,clear}`) and its help."""
    formatter = _formatter(parser)
    rows = "".join(f"<tr><td><code>{html.escape(formatter._format_action_invocation(action))}</code></td>"
                   f"<td>{_html(action.help or '')}{' (required)' if action.required and action.option_strings else ''}"
                   "</td></tr>\n" for action in parser._actions if not isinstance(action, argparse._SubParsersAction))
    return f"<table>\n<tr><th>argument</th><th>meaning</th></tr>\n{rows}</table>\n"


def command_section(name: str, parser: argparse.ArgumentParser, summary: str) -> str:
    description = parser.description or summary
    return (f"## `{name}`\n\n<p>{_html(description)}</p>\n\n```text\n{usage(parser)}\n```\n\n"
            f"{arguments_table(parser)}\n")


def subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The parser's subcommand action: its `.choices` maps each name to its subparser."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def cli_reference(parser: argparse.ArgumentParser) -> str:
    commands = subcommands(parser)
    summaries = {choice.dest: choice.help for choice in commands._choices_actions}
    sections = [command_section(parser.prog, parser, ""), f"```text\n{parser.epilog.strip()}\n```\n"]
    sections += [command_section(f"{parser.prog} {name}", command, summaries[name])
                 for name, command in commands.choices.items()]
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, cli_reference(build_parser())) if MARKER in markdown else markdown
