"""Command-line values checked once, at parse time, with the allowed range in the message.

Every CLI of urfm_fast refuses a bad value here, before any work starts, in one line on stderr with
exit status 2: a size that is not positive or not divisible, a ratio out of range, a learning rate
that is NaN or infinite, a warm-up longer than the run, a path that does not exist or is of the wrong
kind. ``OneLineParser`` does the same for argparse's own errors (a wrong type, an unknown flag).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with control characters (a newline or NUL inside a value the user gave) written as
    escapes, so an error message stays one line whatever the value held."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class FlagError(ValueError):
    """A command-line value outside its allowed range; the message names the flag and the range."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``error: ...``) and exit 2, not a usage block."""

    def error(self, message: str):
        print(f"error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog as written; every option's help ends with its default, once: not when
    the help already states it, nor for a default of None or False (a flag not given)."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        default = action.default
        if "default" in help_ or default is None or default is False or default is argparse.SUPPRESS:
            return help_
        if not action.option_strings:
            return help_
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{help_} (default: {str(shown).replace('%', '%%')})".lstrip()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def int_in(name: str, value, lo: int, hi: int, what: str = "") -> None:
    """An int in [lo, hi] (bool is not an int here)."""
    if value is None or isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FlagError(f"{flag(name)} {value}: must be an integer in [{lo}, {hi}]{what}")


def float_in(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False,
             what: str = "") -> None:
    """A finite float in the interval; ``*_open`` excludes the bound."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise FlagError(f"{flag(name)} {value}: must be a finite number in {interval}{what}")


def _path(name: str, value) -> Path:
    """A path that the OS can look up (no NUL byte, not too long, not empty)."""
    if "\x00" in str(value):  # Path.exists() answers False for it instead of raising
        raise FlagError(f"{flag(name)} {value!r}: not a usable path (a NUL byte)")
    try:
        p = Path(str(value)).expanduser()
        p.exists()
    except (OSError, ValueError, RuntimeError) as e:  # embedded NUL, name too long, unknown ~user
        raise FlagError(f"{flag(name)} {value!r}: not a usable path ({e})") from None
    if not str(value).strip():
        raise FlagError(f"{flag(name)}: empty path")
    return p


def existing(name: str, value: str, kind: str = "any") -> Path:
    """A path that exists and is a file (``kind='file'``), a folder (``'dir'``) or either."""
    p = _path(name, value)
    if not p.exists():
        raise FlagError(f"{flag(name)} {value}: does not exist")
    if kind == "file" and not p.is_file():
        raise FlagError(f"{flag(name)} {value}: must be a regular file")
    if kind == "dir" and not p.is_dir():
        raise FlagError(f"{flag(name)} {value}: must be a folder")
    return p


def writable_dir(name: str, value: str) -> Path:
    """An output folder that exists as a folder, or can be created: its nearest existing ancestor is a
    writable folder. Checked before any long work, so a read-only disk is found at once."""
    p = _path(name, value)
    if p.exists() and not p.is_dir():
        raise FlagError(f"{flag(name)} {value}: exists and is not a folder")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise FlagError(f"{flag(name)} {value}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FlagError(f"{flag(name)} {value}: {probe} is not writable (read-only disk or no permission)")
    return p


def check_writable_now(path: Path) -> None:
    """Write a probe file in the output folder (created for the probe and removed again if new): a
    full disk or a read-only mount is one clear line before the work, not a traceback after it."""
    created = []  # folders this probe makes are removed again: an error later leaves nothing behind
    probe_dir = path
    while not probe_dir.exists():
        created.append(probe_dir)
        probe_dir = probe_dir.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise FlagError(f"--out {path}: cannot write there ({e.strerror or e})") from None
    finally:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
