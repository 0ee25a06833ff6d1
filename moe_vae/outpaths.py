"""Checks of the paths a command writes to, made before it does any work.

Without them a typo in `--out` (a missing directory, a directory where a file goes) surfaces as
an OSError traceback only when the result is written: after the model is loaded and every
metric computed, or after the shards' input is read.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moe_vae.errors import MoeVaeError


def check_out_file(path: Path, suffixes: tuple[str, ...] = (), flag: str = "--out") -> None:
    """`path` can be written as a file: not a directory, a suffix among `suffixes` (any when
    empty), and its directory exists and is writable."""
    if path.is_dir():
        raise MoeVaeError(f"{flag} {str(path)!r} is a directory: expected a file name")
    if suffixes and path.suffix not in suffixes:
        raise MoeVaeError(f"{flag} {str(path)!r}: expected a {' or '.join(suffixes)} file name")
    parent = path.parent  # Path("m.json").parent is Path(".")
    if not parent.exists():
        raise MoeVaeError(
            f"{flag} {str(path)!r}: directory {str(parent)!r} does not exist (create it first)"
        )
    _check_directory(parent, path, flag)


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """`path` is a directory, or one that can be made: not a file, and its nearest existing
    ancestor is a writable directory. Nothing is created here (bad input found later must
    leave no empty directory behind)."""
    if path.exists() and not path.is_dir():
        raise MoeVaeError(f"{flag} {str(path)!r} is a file: expected a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    _check_directory(existing, path, flag)


def why_not_writable(directory: Path) -> str | None:
    """Why no file can be created in `directory`, found by creating (and at once dropping) a
    nameless temporary one; None where that works. Permission bits would not tell: root
    passes os.access everywhere, yet an NFS export that squashes root, or /proc, refuses it."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def _check_directory(directory: Path, path: Path, flag: str) -> None:
    if not directory.is_dir():
        raise MoeVaeError(f"{flag} {str(path)!r}: {str(directory)!r} is not a directory")
    reason = why_not_writable(directory)
    if reason is not None:
        raise MoeVaeError(
            f"{flag} {str(path)!r}: directory {str(directory)!r} is not writable ({reason})"
        )


@contextmanager
def writing(path: Path, flag: str = "--out") -> Iterator[None]:
    """What the checks above cannot foresee (a full disk, a file system that refuses, a
    directory removed meanwhile) is still one line naming the path, not a traceback."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err)
        raise MoeVaeError(f"{flag} {str(path)!r}: cannot write it: {reason}") from None
