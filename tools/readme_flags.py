"""Render the README's flag tables from the scripts' own argparse definitions.

The README must never drift from what the scripts accept: its tables between
``<!-- flags:SCRIPT -->`` and ``<!-- /flags:SCRIPT -->`` are generated here, and a test checks
that the README holds exactly what this module renders. ``--write`` refreshes them.

Usage:  python tools/readme_flags.py [--write]
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Scripts whose flags the README documents, and the function of each that parses its arguments.
SCRIPTS = {"train": "parse_args", "val": "parse_args", "qat": "parse_args", "export_qat": "parse_opt",
           "val_trt": "parse_opt", "detect": "build_parser"}
README = ROOT / "README.md"


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def script_parser(script: str) -> argparse.ArgumentParser:
    """The script's own top-level parser, taken from the very function its CLI calls.

    Capturing it at ``parse_args`` time (rather than asking every script for a builder) means the
    table comes from exactly the parser users meet, subcommands included.
    """
    func = getattr(importlib.import_module(script), SCRIPTS[script])
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        result = func([]) if func.__code__.co_argcount else func()
    except _Captured as caught:
        return caught.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    if isinstance(result, argparse.ArgumentParser):
        return result
    raise TypeError(f"{script}.{SCRIPTS[script]} neither parses arguments nor returns a parser")


def _default_text(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off"  # a switch is off until typed, whichever way it sets its option (--noplots: plots False)
    if action.default in (None, "", argparse.SUPPRESS):
        return ""
    default = action.default
    if isinstance(default, (str, Path)) and str(default).startswith(str(ROOT)):
        default = Path(default).relative_to(ROOT)  # project paths as users see them, not this machine's
    if isinstance(default, (list, tuple)):
        default = " ".join(str(d) for d in default)
    return f"`{default}`"


def _table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        meaning = (action.help or "").replace("|", "\\|")
        if action.choices and not isinstance(action.choices, dict):
            meaning += " (" + ", ".join(str(c) for c in action.choices) + ")"
        rows.append(f"| {names} | {_default_text(action)} | {meaning} |")
    return rows


def render(script: str) -> str:
    """Markdown flag table(s) of one script; one table per subcommand where it has them."""
    parser = script_parser(script)
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return "\n".join(_table(parser))
    parts = []
    for name, sub in subparsers[0].choices.items():
        parts.append(f"`python {script}.py {name}`\n")
        parts.extend(_table(sub))
        parts.append("")
    return "\n".join(parts).rstrip()


def _block(script: str) -> re.Pattern:
    return re.compile(rf"(<!-- flags:{script} -->\n)(.*?)(\n<!-- /flags:{script} -->)", re.S)


def refreshed_readme(text: str) -> str:
    """README text with every flags block replaced by a fresh rendering."""
    for script in SCRIPTS:
        text = _block(script).sub(lambda m, s=script: m.group(1) + render(s) + m.group(3), text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite README.md in place")
    args = ap.parse_args()
    text = README.read_text()
    new = refreshed_readme(text)
    if args.write:
        README.write_text(new)
    elif new != text:
        print("README.md flag tables are stale: run python tools/readme_flags.py --write")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
