"""Files that other processes read while they change (Triton reading a config, the `search` model reading an
index manifest): written beside the target and renamed over it, so a reader sees the old or the new file."""

from __future__ import annotations

import os
from pathlib import Path


def write_private_text(path: Path, text: str) -> None:
    """A new file only its owner can read (0600 from the start, never briefly wider); refuses to overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, path)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data to disk (a folder: its entries, after a rename into it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
