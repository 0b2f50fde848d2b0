"""Folders and files the engine creates on disk: private to the user (0700 / 0600), and
written whole (a temporary file beside the target, renamed over it when complete).

Prompts, answers and token ids end up in traces and caches; other users of the machine have
no business reading them. Folders that already exist are left as they are: not ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
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


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Run `write(tmp)` on a private (0600) temporary file beside `path`, fsync it and rename
    it over `path`: readers see the old file or the complete new one, never a part, and a
    crash leaves at most a `.<name>.*.tmp` file. OSErrors as the file system raises them;
    the temporary file is removed whatever fails."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o600)  # a writer may have replaced the file mkstemp made private
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename is durable only once the folder's entry is on disk too.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
