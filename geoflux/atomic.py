"""Atomic file output: write to a temporary sibling, rename into place only when complete.

An interrupted run therefore never leaves a truncated file under the final name, and a re-run can tell a
finished output from an unfinished one by its name alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from geoflux.errors import OutputExistsError

PART_SUFFIX = ".part"


def part_path(path: Path) -> Path:
    """The temporary name used while ``path`` is being written (same folder, so rename is atomic)."""
    return path.with_name(path.name + PART_SUFFIX)


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path; on success move it to ``path``, on failure remove it.

    Works for files and folders (e.g. zarr stores).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(path)
    remove_tree(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        remove_tree(tmp)
        raise


def remove_tree(p: Path) -> None:
    """Remove a file, symlink or folder if it exists (folders recursively)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()
