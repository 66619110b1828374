"""Atomic output directories: write into a temporary sibling, move into place only on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Union

from gptj_jax.convert.errors import CheckpointError
from gptj_jax.convert.io import remove_weight_files

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def staged_dir(dst: PathLike, *, mode: str = "replace", overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory next to ``dst``; on a clean exit, move its contents to ``dst``.

    ``mode="replace"``: ``dst`` must not exist unless ``overwrite`` (then the old one is removed
    only after the new one is complete). ``mode="merge"``: files are moved into an existing
    ``dst`` (as ``save_pretrained`` does) and stale HF weight files there are deleted.
    On an exception the temporary directory is deleted and ``dst`` is left untouched.
    """
    dst = os.path.abspath(os.fspath(dst))
    if mode not in ("replace", "merge"):
        raise ValueError(f"mode must be 'replace' or 'merge', got {mode!r}")
    if mode == "replace" and os.path.lexists(dst) and not overwrite:
        raise CheckpointError(f"{dst}: destination exists; pass overwrite=True (--overwrite) to replace it")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"{dst}: destination exists and is not a directory")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if mode == "merge" and os.path.isdir(dst):
        remove_weight_files(dst, keep=os.listdir(tmp))
        for name in os.listdir(tmp):
            target = os.path.join(dst, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
        os.rmdir(tmp)
        return
    if os.path.lexists(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
