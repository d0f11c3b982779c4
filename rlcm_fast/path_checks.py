"""Checks of the paths a command will create, before anything is made or loaded: name lengths, names that are
not UTF-8, and a run folder that cannot be made or written (each one line, exit 2). Also how a command printed
for the user to paste back spells a path or any word (shell_path, shell_quote)."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

NAME_MAX = 255  # bytes per file or folder name on Linux's file systems (ext4, xfs, btrfs, tmpfs)
PROBE_PREFIX = ".rlcm-fast-probe-"  # check_run_dir's folder, made and removed to see that a folder can be made


class UsageError(ValueError):
    """Bad command-line input that is not a config value."""


def home_expanded(path):
    """`path` with a leading ~ (or ~user) read as that home folder, as a shell reads it; anything else as it is.
    A path from a config file, a quoted value or `--option=~/x` arrives unexpanded, and nothing downstream expands
    it: pathlib, os.path and diffusers take "~" as a folder's name (a run went into ./~/)."""
    return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path


def check_utf8_name(path, what: str, why: str) -> None:
    """Refuse `path` where its name on disk is not the UTF-8 of its text, which `why` needs: a name that is not
    UTF-8, or a non-ASCII one under a locale that is not UTF-8 (LC_ALL=C escapes its bytes; Latin-1 reads them
    as other letters)."""
    text = str(path)
    raw = os.fsencode(text)
    try:
        if text.encode("utf-8") == raw:
            return
    except UnicodeEncodeError:  # bytes the locale could only escape
        pass
    try:
        shown = raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = raw.decode("utf-8", "backslashreplace")
        raise UsageError(f"{what} '{shown}' is not a UTF-8 name, and {why}: pick another name") from None
    raise UsageError(f"{what} '{shown}' is UTF-8, but this locale reads file names as {sys.getfilesystemencoding()}, "
                     f"and {why}: run under a UTF-8 locale (or with PYTHONUTF8=1)")


def check_name_lengths(path: Path, what: str) -> None:
    """A folder to be made whose path has a name over NAME_MAX bytes: one line now, before any of the folders
    above it are made and left behind by a failed mkdir(parents=True)."""
    for name in Path(path).parts:
        if (size := len(os.fsencode(name))) > NAME_MAX:
            raise UsageError(f"{what} {str(path)!r} cannot be created: its name {name[:60]!r}... is {size} bytes, "
                             f"and a file system takes at most {NAME_MAX} per file or folder name")


def check_run_dir(run_dir: Path, what: str = "output dir") -> None:
    """Before any model loads, a run folder that cannot be made is one line, not an OSError traceback after
    minutes of loading. Nothing is created here: a run refused later leaves no folder behind. `what` names the folder in
    the messages (the command line's option, or a Trainer's argument)."""
    if "\x00" in str(run_dir):  # a Trainer's str (argv cannot hold one): os calls raise "embedded null byte"
        raise UsageError(f"{what} {str(run_dir)!r} is invalid: a path cannot hold a NUL character")
    try:  # a Trainer's str with a lone surrogate (argv's are escaped bytes, which encode): os calls cannot take it
        os.fsencode(str(run_dir))
    except UnicodeEncodeError as exc:
        raise UsageError(f"{what} {str(run_dir)!r} is invalid: {exc.object[exc.start]!r} is a lone surrogate, which "
                         "no file name can hold") from None
    check_name_lengths(run_dir, what)
    check_utf8_name(run_dir, what, "TensorBoard's writer takes only UTF-8")
    if run_dir.exists() and not run_dir.is_dir():  # a file, or a named pipe, socket or device
        kind = "a file" if run_dir.is_file() else "not a folder"
        raise UsageError(f"{what} {str(run_dir)!r} cannot be created: it is {kind}")
    if run_dir.is_symlink() and not run_dir.exists():  # mkdir would say "File exists"
        raise UsageError(f"{what} {str(run_dir)!r} cannot be created: it is a symbolic link to "
                         f"{os.readlink(run_dir)!r}, which does not exist")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if existing != run_dir and not existing.is_dir():
        raise UsageError(f"{what} {str(run_dir)!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {str(run_dir)!r} cannot be created or written: {str(existing)!r} is not writable")
    try:  # os.access says yes to root on a read-only file system or in /proc: make and remove a folder there
        os.rmdir(tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=existing))
    except OSError as exc:
        raise UsageError(f"{what} {str(run_dir)!r} cannot be created or written: making a folder in "
                         f"{str(existing)!r} failed: {exc.strerror or exc}") from None
    # A run folder from elsewhere whose reward.png or samples/ links out would have the run write over the target.
    for entry in os.scandir(run_dir) if existing == run_dir else ():
        if entry.is_symlink():
            raise UsageError(f"{what} {str(run_dir)!r} holds a symbolic link, {entry.name!r} -> "
                             f"{os.readlink(entry.path)!r}; a run writes its files in place and would write through "
                             "it: put the file or folder itself there")


def shell_quote(word: str) -> str:
    """`word` as a printed command must spell it to be pasted back into bash: shlex.quote's spelling, unless the
    word holds bytes that are not UTF-8, which Python reads from the command line as lone surrogates (U+DC80 to
    U+DCFF) and which a printed line cannot carry. Such a word is spelled $'...' (bash, zsh and ksh read it) with
    those bytes, and control characters, as \\xHH."""
    if not any("\udc80" <= char <= "\udcff" for char in word):
        return shlex.quote(word)
    spelled = []
    for char in word:
        if "\udc80" <= char <= "\udcff":
            spelled.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char in "\\'":
            spelled.append("\\" + char)
        elif char.isprintable():
            spelled.append(char)
        else:
            spelled.append("".join(f"\\x{byte:02x}" for byte in char.encode()))
    return "$'" + "".join(spelled) + "'"


def shell_path(path) -> str:
    """A path as a printed command must spell it to be pasted back: quoted for the shell, and not read as an
    option where it starts with a dash."""
    text = str(path)
    return shell_quote(f"./{text}" if text.startswith("-") else text)
