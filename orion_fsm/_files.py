"""Folders the engine creates on disk: private to the user (0700), as are its files (0600).

Prompts, answers and token ids end up in traces and caches; other users of the machine have
no business reading them. Folders that already exist are left as they are: not ours.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def make_private_dirs(directory: Path) -> None:
    """`mkdir -p directory`, each folder it creates 0700. NotADirectoryError if a file is in
    the way; other OSErrors as mkdir raises them."""
    missing: list[Path] = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
