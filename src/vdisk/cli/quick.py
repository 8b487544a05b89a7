"""The commands answered without click: ``--version``, ``--help``, a plain ``info`` and a plain
``convert``.

They are the ones a user (or a script polling images) runs most often, and importing click
alone costs several bare interpreter starts (for an empty convert, more than its copy). Each answers exactly as the click tree would, byte
for byte (tests compare the two); anything unusual (another flag, a bad value, a narrow
terminal's odd wrap) returns None and goes to click, which owns every error message.
"""

from __future__ import annotations

import os
import sys

from . import COMMAND_TABLE, DESCRIPTION

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

_USAGE = "Usage: vdisk [OPTIONS] [COMMAND] [ARGS]..."
_OPTIONS = (
    ("-V, --version", "Show the version and exit."),
    ("-h, --help", "Show this message and exit."),
)


def answer(args: list[str]) -> int | None:
    """Run ``vdisk ARGS`` if it is one of the quick commands; None when click must run it."""
    if args in (["--version"], ["-V"]):
        from .. import __version__

        _write(f"vdisk version {__version__}\n")
        return 0
    if args in (["--help"], ["-h"]):
        text = help_text(help_width())
        if text is None:
            return None
        _write(text)
        return 0
    if args and args[0] in ("info", "convert"):
        _forget_secrets()
        return _info(args[1:]) if args[0] == "info" else _convert(args[1:])
    return None


def _forget_secrets() -> None:
    """What each click command does first: the secrets (``--object``) and passphrases of an
    earlier command run in this process are dropped. Neither module is loaded in a fresh one."""
    options = sys.modules.get("vdisk.cli.options")
    if options is not None:
        options.SECRETS.clear()
    encryption = sys.modules.get("vdisk.qcow2.encryption")
    if encryption is not None:
        encryption.forget_passphrases()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _info(args: list[str]) -> int | None:
    """``info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE``, spelled plainly."""
    fmt: str | None = None
    output = "human"
    chain = force_share = False
    files = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-f", "--output") and i + 1 < len(args):
            if arg == "-f":
                fmt = args[i + 1]
            else:
                output = args[i + 1]
            i += 2
            continue
        if arg.startswith("--output="):
            output = arg.removeprefix("--output=")
        elif arg == "--backing-chain":
            chain = True
        elif arg in ("-U", "--force-share"):
            force_share = True
        elif arg.startswith("-"):
            return None  # --help, --object, --image-opts, joined flags, `--`: click's
        else:
            files.append(arg)
        i += 1
    if len(files) != 1 or output not in ("human", "json"):
        return None
    from .. import info

    _write(info.report(files[0], fmt, output, chain, force_share))
    return 0


# convert's flags answered here (as cli/convert.py declares them): keyword of
# converting.run, and whether the flag takes a value. The others (-o, -B, -F, -c, -l, -p,
# --salvage, --bitmaps, --object, ...) and every odd spelling are click's.
_CONVERT_FLAGS = {
    "-f": ("fmt", True),
    "-O": ("out_fmt", True),
    "-S": ("sparse", True),
    "-m": ("workers", True),
    "-r": ("rate", True),
    "-t": ("cache", True),
    "-T": ("src_cache", True),
    "-n": ("skip_create", False),
    "-W": ("out_of_order", False),
    "-q": ("quiet", False),
    "-U": ("force_share", False),
    "--force-share": ("force_share", False),
}


def _convert(args: list[str]) -> int | None:
    """``convert`` with the flags of ``_CONVERT_FLAGS``, each a word of its own, a value in
    the next word (not one starting with ``-``), the last of a repeated flag winning, the
    files anywhere among them: as click parses those."""
    given: dict[str, object] = {}
    files = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            files.append(arg)
            i += 1
            continue
        flag = _CONVERT_FLAGS.get(arg)
        if flag is None:
            return None
        name, takes_value = flag
        if not takes_value:
            given[name] = True
            i += 1
            continue
        if i + 1 == len(args) or args[i + 1].startswith("-"):
            return None  # a missing value, or one click may read as a flag: click's to say
        given[name] = args[i + 1]
        i += 2
    from .converting import run

    try:
        return run(files, **given)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        # What click does with ^C outside the copy: a blank line, then run_click's message.
        sys.stderr.write("\nvdisk: aborted\n")
        sys.stderr.flush()
        return 1


def help_width() -> int:
    """The width click formats help for: the terminal's, at most 80, less 2, at least 50."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return max(min(columns or 80, 80) - 2, 50)


def help_text(width: int) -> str | None:
    """``vdisk --help`` as click renders it at ``width``; None if a word cannot fit a line."""
    description = _wrap(DESCRIPTION, width, "  ", "  ")
    if description is None:
        return None
    parts = [_USAGE, "", *description, ""]
    for title, rows in (
        ("Options", _OPTIONS),
        ("Commands", [(name, COMMAND_TABLE[name][2]) for name in sorted(COMMAND_TABLE)]),
    ):
        lines = _definition_list(rows, width)
        if lines is None:
            return None
        parts += [f"{title}:", *lines]
        if title == "Options":
            parts.append("")
    return "\n".join(parts) + "\n"


def _definition_list(rows: Sequence[tuple[str, str]], width: int) -> list[str] | None:
    """Two columns as click's ``write_dl`` sets them: terms padded, help wrapped beside them."""
    first = min(max(len(term) for term, _ in rows), 30) + 2
    text_width = max(width - first - 2, 10)
    out = []
    for term, text in rows:
        wrapped = _wrap(text, text_width, "", "")
        if wrapped is None or len(term) > first - 2:
            return None  # a term on its own line: leave such layouts to click
        out.append(f"  {term:<{first}}{wrapped[0]}".rstrip())
        out += [" " * (first + 2) + line for line in wrapped[1:]]
    return out


def _chunks(text: str) -> list[str]:
    """Words, the spaces between them, and the parts of hyphenated words: the pieces textwrap
    (under click) breaks lines between."""
    pieces: list[str] = []
    for i, word in enumerate(text.split(" ")):
        if i:
            pieces.append(" ")
        start = 0
        for j in range(len(word)):
            if word[j] == "-" and _hyphen_breaks(word, j):
                pieces.append(word[start : j + 1])
                start = j + 1
        pieces.append(word[start:])
    return [p for p in pieces if p]


def _hyphen_breaks(word: str, j: int) -> bool:
    """textwrap's rule: a line may break after the hyphen at ``j`` with two letters before it
    and two after, a second hyphen allowed between those ("qemu-|img")."""
    after = word[j + 1 : j + 4]
    if after[1:2] == "-":
        after = after[0] + after[2:]
    return j >= 2 and _letters(word[j - 2 : j]) and _letters(after[:2])


def _letters(text: str) -> bool:
    """Two letters as textwrap's pattern counts them (word characters other than digits)."""
    return len(text) == 2 and all(ch == "_" or ch.isalpha() for ch in text)


def _wrap(text: str, width: int, first_indent: str, indent: str) -> list[str] | None:
    """Greedy line filling as textwrap does it; None if a piece is wider than a line."""
    lines: list[str] = []
    line: list[str] = []
    used = 0
    for piece in _chunks(" ".join(text.split())):
        room = width - len(indent if lines else first_indent)
        if used + len(piece) > room:
            if not line:
                return None
            lines.append((indent if lines else first_indent) + "".join(line).rstrip())
            line, used = [], 0
            if piece == " ":
                continue
            if len(piece) > width - len(indent):
                return None
        line.append(piece)
        used += len(piece)
    if line:
        lines.append((indent if lines else first_indent) + "".join(line).rstrip())
    return lines
