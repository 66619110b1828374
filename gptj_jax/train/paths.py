"""Local or remote paths for training runs and data: ``model_dir``, ``train_set`` and ``val_set`` may be local
directories or URLs such as ``gs://bucket/run``.

Local paths go through ``os`` (and are made absolute, as ``train`` always did); URLs go through
``etils.epath``, orbax's own path layer (``gs://`` needs ``gcsfs`` or TensorFlow installed), and are passed on
unchanged: to orbax, to the metrics and config writers and to TensorBoard.
"""

from __future__ import annotations

import os
import uuid
from typing import Any


def is_remote(path: str) -> bool:
    """True for a URL (``gs://bucket/dir``, ``s3://...``), False for a local path."""
    return "://" in os.fspath(path)


def run_path(path: str) -> str:
    """``path`` as a run uses it: a local path made absolute, a URL unchanged (never ``./gs:/bucket``)."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def epath(path: str) -> Any:
    """``etils.epath.Path(path)`` (imported on first use)."""
    from etils import epath as epath_lib

    return epath_lib.Path(path)


def join(path: str, *names: str) -> str:
    """``os.path.join`` for a local path; ``/``-joined for a URL."""
    if is_remote(path):
        return "/".join([path.rstrip("/"), *names])
    return os.path.join(path, *names)


def exists(path: str) -> bool:
    return epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def size(path: str) -> int:
    """Size of a file in bytes."""
    return int(epath(path).stat().length) if is_remote(path) else os.path.getsize(path)


def read_text(path: str, errors: str = "strict") -> str:
    """The UTF-8 text of a file (``errors`` as in ``bytes.decode``)."""
    if is_remote(path):
        return epath(path).read_bytes().decode("utf-8", errors=errors)
    with open(path, encoding="utf-8", errors=errors) as f:
        return f.read()


def write_text_atomic(path: str, text: str) -> None:
    """Replace the file at ``path`` with ``text`` in one piece: a local file through a temporary sibling and a
    rename; a remote object by one upload (an object store replaces an object atomically)."""
    if is_remote(path):
        epath(path).write_text(text, encoding="utf-8")
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_writable(directory: str) -> None:
    """Create ``directory`` (with its parents) and write and delete a small probe file in it.

    Raises the filesystem's error (OSError, or ImportError when a URL's filesystem is not installed)."""
    probe = join(directory, f".gptj-jax-write-probe-{uuid.uuid4().hex}")
    if is_remote(directory):
        epath(directory).mkdir(parents=True, exist_ok=True)
        p = epath(probe)
        p.write_text("gptj-jax checks that it can write here\n", encoding="utf-8")
        p.unlink()
        return
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w", encoding="utf-8") as f:
        f.write("gptj-jax checks that it can write here\n")
    os.remove(probe)
