"""Atomic output directories: write into a temporary sibling, move into place only on success.

A write to ``DST`` stages in ``.DST.tmp-XXXX`` (and, when replacing, parks the old ``DST`` in
``.DST.old-XXXX``). Each of these holds a small marker file, :data:`MARKER`, naming its writer:
``{"pid", "host", "boot_id", "start"}`` (``start``: the process start time in clock ticks since boot,
field 22 of ``/proc/<pid>/stat``, so a reused pid is not mistaken for the writer). A writer killed
with ``-9`` cannot clean up after itself; the next write to the same ``DST`` removes such stale
siblings, one line on stderr each, when their marker names a process on this host that is gone.
A sibling whose writer is alive, runs on another host, or that carries no marker of ours is left
alone, as is a stale ``.old-`` sibling while ``DST`` itself is missing (it may be the only copy).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
from typing import Any, Iterator, Optional, Union

from gptj_jax.convert.errors import CheckpointError
from gptj_jax.convert.io import remove_weight_files

PathLike = Union[str, os.PathLike]
MARKER = ".gptj-jax-writer.json"
OLD_DATA = "data"  # inside a ``.old-`` sibling: the previous DST, moved there whole


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _boot_id() -> Optional[str]:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _stat(pid: int) -> Optional[list[str]]:
    """Fields 3.. of ``/proc/<pid>/stat`` (state, ppid, ...), None where there is no such file."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None or ")" not in stat:
        return None
    return stat.rsplit(")", 1)[1].split()  # the command name (field 2) is in parentheses and may hold spaces


def _start_time(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), None if unknown."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def writer_record() -> dict[str, Any]:
    """This process as a marker names it: pid, host name, boot id and start time."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start": _start_time(pid)}


def _write_marker(directory: str) -> None:
    with open(os.path.join(directory, MARKER), "w", encoding="utf-8") as f:
        json.dump(writer_record(), f)


def _read_marker(directory: str) -> Optional[dict[str, Any]]:
    text = _read_text(os.path.join(directory, MARKER))
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or not isinstance(data.get("host"), str):
        return None
    return data


def writer_is_gone(record: dict[str, Any]) -> bool:
    """True only when ``record`` names a process on this host that no longer runs.

    Another host's writer, or one whose state cannot be told, counts as alive.
    """
    if record["host"] != socket.gethostname():
        return False
    boot = _boot_id()
    if boot is not None and record.get("boot_id") is not None and record["boot_id"] != boot:
        return True  # this host rebooted since the writer started
    pid = record["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, belongs to another user
        pass
    except OSError:
        return False
    fields = _stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return True
    start = record.get("start")
    now = _start_time(pid)
    return start is not None and now is not None and now != start  # the pid was reused


def _disk_usage(path: str) -> int:
    """Bytes the files under ``path`` take on disk (allocated blocks, as ``du``; sizes where unknown)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def clean_stale_siblings(dst: PathLike) -> list[str]:
    """Remove ``.DST.tmp-*`` / ``.DST.old-*`` siblings left by writers of ``dst`` that were killed.

    Only siblings with our marker naming a process on this host that no longer exists are removed,
    and ``.old-`` ones only while ``dst`` exists. Prints one line on stderr per removal; returns
    the removed paths.
    """
    dst = os.path.abspath(os.fspath(dst))
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    if not os.path.isdir(parent):
        return []
    removed = []
    for name in sorted(os.listdir(parent)):
        if not (name.startswith(f".{base}.tmp-") or name.startswith(f".{base}.old-")):
            continue
        path = os.path.join(parent, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        record = _read_marker(path)
        if record is None or not writer_is_gone(record):
            continue
        if name.startswith(f".{base}.old-") and not os.path.lexists(dst):
            print(
                f"gptj-jax: keeping {path}: left by process {record['pid']} (gone) while replacing {dst}, which is "
                f"missing; {os.path.join(path, OLD_DATA)} may be its only copy",
                file=sys.stderr,
                flush=True,
            )
            continue
        size = _disk_usage(path)
        shutil.rmtree(path, ignore_errors=True)  # another rerun may be removing it at the same time
        if os.path.lexists(path):
            print(f"gptj-jax: could not remove stale {path} left by process {record['pid']}", file=sys.stderr, flush=True)
            continue
        removed.append(path)
        print(
            f"gptj-jax: removed stale {path} ({_fmt_bytes(size)} on disk) left by process {record['pid']} on "
            f"{record['host']}, which is gone",
            file=sys.stderr,
            flush=True,
        )
    return removed


@contextlib.contextmanager
def staged_dir(dst: PathLike, *, mode: str = "replace", overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory next to ``dst``; on a clean exit, move its contents to ``dst``.

    ``mode="replace"``: ``dst`` must not exist unless ``overwrite`` (then the old one is removed
    only after the new one is complete). ``mode="merge"``: files are moved into an existing
    ``dst`` (as ``save_pretrained`` does) and stale HF weight files there are deleted.
    On an exception the temporary directory is deleted and ``dst`` is left untouched. Stale
    siblings of earlier killed writes to ``dst`` are removed first (:func:`clean_stale_siblings`).
    The yielded directory holds :data:`MARKER`, which is not moved to ``dst``.
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
    clean_stale_siblings(dst)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        _write_marker(tmp)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.remove(os.path.join(tmp, MARKER))
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
        # The old DST goes into a marked sibling first, so a kill between the two renames leaves
        # it recoverable there (and recognisable as ours), never half-deleted under its own name.
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
        _write_marker(old)
        os.replace(dst, os.path.join(old, OLD_DATA))
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
