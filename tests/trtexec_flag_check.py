"""Collect the flags shell scripts pass to ``trtexec`` and check them against trtexec 10's documented list.

trtexec cannot run on CI, so a misspelt or TensorRT-8-only flag (``--workspace``, ``--explicitBatch``)
would first fail on a GPU machine. Scripts build part of the command in variables (``$precision``,
``"${timing_flags[@]}"``), so a variable on a trtexec line contributes the flags of every value the
script ever assigns to it, in any branch.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from tests.project_files import project_files

FLAGS_FILE = Path(__file__).resolve().parent / "data" / "trtexec10_flags.txt"
# A command word that runs trtexec: the binary by name or path, or the scripts' $TRTEXEC override.
_TRTEXEC_WORD = re.compile(r"^(\S*/)?trtexec$|^\$\{?TRTEXEC\}?$")
# A word that is nothing but one variable: $x, ${x}, ${x[@]}.
_VARIABLE_WORD = re.compile(r"^\$\{?(\w+)(\[[@*]\])?\}?$")
# Words that may stand before a command's name.
_PREFIX_WORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "{", "time", "exec", "command"}


@dataclass(frozen=True)
class FlagUse:
    path: str
    line: int
    flag: str
    via: str  # the variable it came through, or "" when written on the command line

    def __str__(self) -> str:
        source = f" (through ${self.via})" if self.via else ""
        return f"{self.path}:{self.line}: trtexec {self.flag}{source}"


def documented_flags() -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in FLAGS_FILE.read_text().splitlines())
    return {line for line in lines if line}


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each command line, with backslash continuations joined."""
    joined: list[tuple[int, str]] = []
    start, parts = 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if not parts:
            start = number
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        joined.append((start, " ".join(parts + [line])))
        parts = []
    if parts:
        joined.append((start, " ".join(parts)))
    return joined


def _commands(line: str) -> list[list[str]]:
    """The simple commands of a line as shell words (quotes removed), split at |, ||, &&, ;, &;
    a redirection ends its command's words."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    redirected = False
    try:
        for word in lexer:
            if word and set(word) <= set("|&;()"):
                commands.append([])
                redirected = False
            elif word and set(word) <= set("<>&"):
                redirected = True
            elif not redirected:
                commands[-1].append(word)
    except ValueError:  # an unbalanced quote: a multi-line string we do not join
        pass
    return [words for words in commands if words]


def _trtexec_arguments(words: list[str]) -> list[str] | None:
    """The arguments of a trtexec command, or None when ``words`` run something else."""
    index = 0
    while index < len(words) and (words[index] in _PREFIX_WORDS or re.match(r"^\w+=", words[index])):
        index += 1
    return words[index + 1:] if index < len(words) and _TRTEXEC_WORD.match(words[index]) else None


def _words(value: str) -> list[str]:
    return [word for command in _commands(value) for word in command]


def _assigned_values(text: str, name: str) -> list[tuple[bool, list[str]]]:
    """Every value the script assigns to ``name``, in any branch: (is an array, its elements);
    a plain variable has one element, its string."""
    values = []
    for match in re.finditer(rf"(?<![\w$]){re.escape(name)}=(\([^)]*\)|\"[^\"]*\"|'[^']*'|[^\s;]*)", text):
        value = match.group(1)
        if value.startswith("("):
            values.append((True, _words(value[1:-1])))
        else:
            values.append((False, [" ".join(_words(value))]))
    return values


def _expansion(line: str, name: str, elements: list[str]) -> list[str]:
    """The words ``$name`` becomes on ``line``: quoted ("$x", "${x[@]}"), each element stays one word;
    unquoted, each is split at whitespace."""
    quoted = re.search(rf'"\$\{{?{re.escape(name)}(\[[@*]\])?\}}?"', line) is not None
    return elements if quoted else [word for element in elements for word in element.split()]


def _flags_in(words: list[str]) -> list[str]:
    return [word.split("=", 1)[0] for word in words if word.startswith("-")]


def trtexec_flag_uses(text: str, path: str = "<script>") -> tuple[list[FlagUse], list[str]]:
    """The flags each trtexec command in ``text`` passes, and the problems that stop the check
    (a variable on a trtexec line that the script never assigns)."""
    uses: list[FlagUse] = []
    problems: list[str] = []

    def collect(words: list[str], line: str, number: int, via: str, seen: frozenset[str]) -> None:
        for word in words:
            variable = _VARIABLE_WORD.match(word)
            if not variable:
                uses.extend(FlagUse(path, number, flag, via) for flag in _flags_in([word]))
                continue
            name = variable.group(1)
            values = _assigned_values(text, name)
            if not values:
                problems.append(f"{path}:{number}: ${name} on a trtexec line is never assigned in the script")
            for _, elements in values if name not in seen else []:
                collect(_expansion(line, name, elements), line, number, via or name, seen | {name})

    for number, line in _logical_lines(text):
        if line.lstrip().startswith("#"):
            continue
        for words in _commands(line):
            arguments = _trtexec_arguments(words)
            if arguments is not None:
                collect(arguments, line, number, "", frozenset())
    return uses, problems


def runs_trtexec(text: str) -> bool:
    return any(_trtexec_arguments(words) is not None
               for _, line in _logical_lines(text) if not line.lstrip().startswith("#")
               for words in _commands(line))


def trtexec_scripts(root: Path) -> list[Path]:
    """Project shell scripts that run trtexec."""
    return [path for path in project_files(root, ".sh") if runs_trtexec(path.read_text())]
