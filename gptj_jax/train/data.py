"""Training data: ``prepare`` (text -> packed token records on disk) and the loaders that read them.

On-disk format of a prepared directory (mtj's recipe: each document tokenized, EOS 50256 appended,
everything concatenated and cut into ``seq + 1``-token records; the tail that does not fill a record is
dropped)::

    DIR/index.json          {"format": "gptj-jax-tokens", "version": 1, "seq": S, "record_len": S + 1,
                             "dtype": "uint16", "shards": [{"file": "tokens-00000.bin", "records": n}, ...],
                             "num_records", "num_tokens", "num_documents", "num_bytes", "dropped_tokens",
                             "eos_token_id", "sources"}
    DIR/tokens-00000.bin    raw little-endian uint16, records back to back: [n, S + 1]

``index.json`` is written last, so a directory without it is an unfinished ``prepare``. ``num_bytes``
(UTF-8 bytes of the text that went into records, pro rata) gives bits per byte in ``gptj-jax eval``.

The training loader is a ``grain`` ``DataLoader`` over :class:`TokenRecords`: shuffled per epoch from the
seed, sharded by JAX process, endless; its iterator state (the data position) is saved in every checkpoint.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

import numpy as np

from gptj_jax.tokenizer import EOS_TOKEN_ID
from gptj_jax.train import paths

INDEX = "index.json"
FORMAT = "gptj-jax-tokens"
SHARD_BYTES = 256 * 2**20


class DataError(ValueError):
    """A data directory or input file is missing, empty or inconsistent with the config."""


# ---------------------------------------------------------------------------------------- reading text
def iter_documents(path: str) -> Iterator[str]:
    """Documents in one input file: a ``.txt`` file is one document; ``.jsonl`` / ``.jsonl.zst`` give each
    line's ``text`` field. Errors name the file and line.

    A ``.jsonl`` line that is not UTF-8 is an error; a ``.txt`` file that is not UTF-8 is read with the bad
    bytes replaced by U+FFFD, with a warning naming the file and the first bad byte.
    """
    if not os.path.isfile(path):
        raise DataError(f"input file {path} does not exist")
    if path.endswith(".txt"):
        with open(path, "rb") as f:
            data = f.read()
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as e:
            warnings.warn(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason}); invalid bytes replaced with U+FFFD",
                          stacklevel=2)
            yield data.decode("utf-8", errors="replace")
        return
    if path.endswith(".jsonl.zst") or path.endswith(".jsonl.zstd"):
        import zstandard

        raw = open(path, "rb")
        lines: Iterable[bytes] = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    elif path.endswith(".jsonl") or path.endswith(".json"):
        raw = open(path, "rb")
        lines = raw
    else:
        raise DataError(f"input file {path}: unsupported extension; expected .txt, .jsonl or .jsonl.zst")
    with raw:
        for lineno, raw_line in enumerate(lines, 1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line: {e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
            yield record["text"]


def _batched(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


_TOKENIZER: Any = None


def _tokenize_batch(docs: list[str]) -> list[tuple[np.ndarray, int]]:
    """(token ids with EOS appended as uint16, UTF-8 byte count) per document. Runs in a worker process."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from gptj_jax.tokenizer import load_tokenizer

        _TOKENIZER = load_tokenizer()
    ids = _TOKENIZER(docs, add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for doc, toks in zip(docs, ids):
        arr = np.empty(len(toks) + 1, np.uint16)
        arr[:-1] = toks
        arr[-1] = EOS_TOKEN_ID
        out.append((arr, len(doc.encode("utf-8"))))
    return out


# ---------------------------------------------------------------------------------------- prepare
def prepare(
    inputs: Sequence[str],
    output: str,
    seq: int = 2048,
    workers: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
    docs_per_task: int = 64,
) -> dict:
    """Tokenize ``inputs`` in ``workers`` processes and write packed ``seq + 1``-token records to ``output``.

    Returns the index dict. Raises DataError for a missing or unsupported input, an output that already
    holds a prepared set (unless ``overwrite``), or a corpus too small for one record.
    """
    from tqdm import tqdm

    if seq <= 0:
        raise DataError(f"--seq must be > 0, got {seq}")
    if not inputs:
        raise DataError("no --input files given")
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"input file {path} does not exist")
    # Check the output before any tokenizing: a bad --output fails at once and leaves nothing behind.
    if paths.is_remote(output):
        raise DataError(f"--output {output}: prepare writes a local directory; copy it to {output} afterwards "
                        "(train_set and val_set read gs:// directories)")
    if os.path.exists(output) and not os.path.isdir(output):
        raise DataError(f"--output {output} is a file, not a directory; give a directory to write {INDEX} and the "
                        "token shards to")
    if os.path.exists(os.path.join(output, INDEX)) and not overwrite:
        raise DataError(f"{output} already holds a prepared data set ({INDEX}); pass --overwrite to replace it")
    workers = workers or os.cpu_count() or 1
    record_len = seq + 1
    tmp = output.rstrip("/") + ".tmp-prepare"
    if os.path.exists(tmp) and not os.path.isdir(tmp):
        raise DataError(f"{tmp} is a file; prepare needs that name for its temporary directory")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise DataError(f"--output {output}: cannot create {tmp} ({e.strerror or e})") from None
    records_per_shard = max(SHARD_BYTES // (2 * record_len), 1)

    shards: list[dict] = []
    buf = np.empty(0, np.uint16)
    buf_bytes = 0.0  # text bytes not yet written (pro rata)
    totals = {"num_tokens": 0, "num_documents": 0, "num_bytes": 0.0, "num_records": 0}
    shard_file = None
    shard_count = 0

    def write_records(records: np.ndarray) -> None:
        nonlocal shard_file, shard_count
        while len(records):
            if shard_file is None or shard_count == records_per_shard:
                if shard_file is not None:
                    shard_file.close()
                name = f"tokens-{len(shards):05d}.bin"
                shards.append({"file": name, "records": 0})
                shard_file = open(os.path.join(tmp, name), "wb")
                shard_count = 0
            take = min(len(records), records_per_shard - shard_count)
            shard_file.write(records[:take].astype("<u2").tobytes())
            shards[-1]["records"] += take
            shard_count += take
            records = records[take:]

    docs = (doc for path in inputs for doc in iter_documents(path))
    tasks = _batched(docs, docs_per_task)
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers)
            results: Iterable[list] = pool.imap(_tokenize_batch, tasks, chunksize=1)
        else:
            results = map(_tokenize_batch, tasks)
        bar = tqdm(desc=f"prepare {output}", unit=" docs", disable=not progress, dynamic_ncols=True)
        for batch in results:
            for toks, nbytes in batch:
                totals["num_documents"] += 1
                totals["num_tokens"] += len(toks)
                buf = np.concatenate([buf, toks])
                buf_bytes += nbytes
            n = len(buf) // record_len
            if n:
                used = n * record_len
                written_bytes = buf_bytes * used / len(buf)
                totals["num_bytes"] += written_bytes
                buf_bytes -= written_bytes
                write_records(buf[:used].reshape(n, record_len))
                totals["num_records"] += n
                buf = buf[used:]
            bar.update(len(batch))
            bar.set_postfix(tokens=totals["num_tokens"], records=totals["num_records"])
        bar.close()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if shard_file is not None:
            shard_file.close()

    if totals["num_records"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"the corpus ({', '.join(inputs)}) gave {totals['num_tokens']} tokens in {totals['num_documents']} "
            f"documents: fewer than one record of seq + 1 = {record_len} tokens; add text or lower --seq"
        )
    try:
        index = _finish_prepare(output, tmp, shards, totals, seq, len(buf), inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _finish_prepare(output: str, tmp: str, shards: list, totals: dict, seq: int, dropped: int,
                    inputs: Sequence[str]) -> dict:
    """Write ``index.json`` into ``tmp`` and move the prepared set to ``output``; returns the index."""
    index = {
        "format": FORMAT,
        "version": 1,
        "seq": seq,
        "record_len": seq + 1,
        "dtype": "uint16",
        "shards": shards,
        "num_records": totals["num_records"],
        "num_tokens": totals["num_tokens"],
        "num_documents": totals["num_documents"],
        "num_bytes": int(round(totals["num_bytes"])),
        "dropped_tokens": int(dropped),
        "eos_token_id": EOS_TOKEN_ID,
        "sources": [os.path.abspath(p) for p in inputs],
    }
    with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    if os.path.exists(output):
        for name in os.listdir(output):
            if name == INDEX or (name.startswith("tokens-") and name.endswith(".bin")):
                os.remove(os.path.join(output, name))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(output, name))
        os.rmdir(tmp)
    else:
        os.replace(tmp, output)
    return index


# ---------------------------------------------------------------------------------------- records
class TokenRecords:
    """Random access to the ``[seq + 1]`` uint16 records of a prepared directory (grain data source).

    ``len(r)`` records; ``r[i]`` is a fresh ``np.ndarray[uint16]`` of shape ``[seq + 1]``. A local directory's
    shards are memory-mapped on first use (so the object pickles small for grain workers); a remote one's
    (``gs://bucket/data``, read through etils.epath) are opened on first use and each record is one ranged read.
    """

    def __init__(self, directory: str, key: str = "data directory") -> None:
        self.directory = directory
        self._remote = paths.is_remote(directory)
        index_path = paths.join(directory, INDEX)
        try:
            found_dir = paths.isdir(directory)
            found_index = found_dir and paths.isfile(index_path)
            text = paths.read_text(index_path) if found_index else ""
        except OSError as e:
            raise DataError(f"{key} {directory}: cannot read it ({type(e).__name__}: {e})") from None
        except ImportError as e:  # e.g. gs:// without gcsfs
            raise DataError(f"{key} {directory}: cannot read it ({e})") from None
        if not found_dir:
            raise DataError(f"{key} {directory} does not exist; create it with `gptj-jax prepare --output {directory}`")
        if not found_index:
            raise DataError(f"{key} {directory} has no {INDEX}: not a directory written by `gptj-jax prepare` "
                            "(or prepare did not finish)")
        try:
            self.index = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{index_path}: not valid JSON ({e})") from None
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT:
            got = self.index.get("format") if isinstance(self.index, dict) else type(self.index).__name__
            raise DataError(f"{index_path}: format is {got!r}, expected {FORMAT!r}")
        self.seq = int(self.index["seq"])
        self.record_len = int(self.index["record_len"])
        counts = [int(s["records"]) for s in self.index["shards"]]
        self._starts = np.cumsum([0] + counts)
        self._maps: list[Optional[np.ndarray]] = [None] * len(counts)
        self._files: list[Any] = [None] * len(counts)  # remote: open binary files
        self._lock = threading.Lock()
        if self._starts[-1] == 0:
            raise DataError(f"{key} {directory} holds no records")
        for s in self.index["shards"]:
            path = paths.join(directory, s["file"])
            expected = int(s["records"]) * self.record_len * 2
            if not paths.isfile(path) or paths.size(path) != expected:
                raise DataError(f"{path}: missing or not {expected} bytes ({s['records']} records of {self.record_len})")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, i: int) -> np.ndarray:
        m = self._maps[i]
        if m is None:
            path = os.path.join(self.directory, self.index["shards"][i]["file"])
            m = np.memmap(path, dtype="<u2", mode="r").reshape(-1, self.record_len)
            self._maps[i] = m
        return m

    def _read_remote(self, i: int, row: int) -> np.ndarray:
        """Record ``row`` of remote shard ``i``: one seek and read (under a lock: grain reads from threads)."""
        nbytes = self.record_len * 2
        with self._lock:
            f = self._files[i]
            if f is None:
                f = paths.epath(paths.join(self.directory, self.index["shards"][i]["file"])).open("rb")
                self._files[i] = f
            f.seek(row * nbytes)
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise DataError(f"{self.directory}: shard {self.index['shards'][i]['file']} ended inside record {row}")
        return np.frombuffer(data, dtype="<u2").astype(np.uint16)

    def __getitem__(self, idx: int) -> np.ndarray:
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"record {idx} out of range [0, {len(self)})")
        s = int(np.searchsorted(self._starts, idx, side="right") - 1)
        if self._remote:
            return self._read_remote(s, idx - int(self._starts[s]))
        return np.array(self._shard(s)[idx - self._starts[s]], dtype=np.uint16)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Records ``[start, stop)`` as one ``[n, seq + 1]`` uint16 array."""
        return np.stack([self[i] for i in range(start, stop)]) if stop > start else np.empty((0, self.record_len), np.uint16)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self._maps)
        state["_files"] = [None] * len(self._files)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # goes into grain's saved state: no paths, so a moved data set still restores
        return f"TokenRecords(records={len(self)}, record_len={self.record_len})"

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per token in the records (for bits per byte)."""
        tokens = len(self) * self.record_len
        return float(self.index.get("num_bytes", 0)) / tokens if tokens else 0.0


def check_records(records: TokenRecords, seq: int, key: str) -> None:
    """Raise DataError when a prepared set was made for another ``seq``."""
    if records.seq != seq:
        raise DataError(
            f"{key} {records.directory} was prepared with --seq {records.seq} but the config has seq={seq}; "
            f"prepare it again with --seq {seq}"
        )


# ---------------------------------------------------------------------------------------- loaders
def train_loader(records: TokenRecords, batch_per_process: int, seed: int, shuffle: bool = True,
                 worker_count: int = 0) -> Any:
    """An endless grain ``DataLoader`` of ``[batch_per_process, seq + 1]`` uint16 batches.

    The order is a function of ``seed`` only (shuffled per epoch when ``shuffle``); each JAX process reads
    its own shard of the records. ``iter(loader)`` gives an iterator with ``get_state`` / ``set_state``
    (what checkpoints save).
    """
    import grain.python as grain

    sampler = grain.IndexSampler(
        num_records=len(records),
        shard_options=grain.ShardByJaxProcess(drop_remainder=True),
        shuffle=shuffle,
        num_epochs=None,
        seed=seed,
    )
    return grain.DataLoader(
        data_source=records,
        sampler=sampler,
        operations=[grain.Batch(batch_per_process, drop_remainder=True)],
        worker_count=worker_count,
    )


def eval_batches(records: TokenRecords, global_batch: int, max_batches: Optional[int], process_index: int = 0,
                 process_count: int = 1) -> Iterator[np.ndarray]:
    """The first ``max_batches`` (None: all) whole batches of records in order, this process's rows of each.

    Yields ``[global_batch / process_count, seq + 1]`` uint16 arrays. Raises DataError when the set has fewer
    records than one batch.
    """
    n_batches = len(records) // global_batch
    if n_batches == 0:
        raise DataError(
            f"validation set {records.directory} has {len(records)} records, fewer than one batch of {global_batch}; "
            "add text or lower per_replica_batch"
        )
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    local = global_batch // process_count
    for b in range(n_batches):
        start = b * global_batch + process_index * local
        yield records.rows(start, start + local)


def write_records(output: str, records: np.ndarray, num_bytes: int = 0) -> dict:
    """Write already-tokenized ``[n, seq + 1]`` records as a prepared directory (synthetic data, tests).

    Same format as :func:`prepare`; ``num_bytes`` is the text size they stand for (0: unknown).
    """
    records = np.asarray(records)
    if records.ndim != 2 or records.shape[0] == 0 or records.shape[1] < 2:
        raise DataError(f"records must be [n >= 1, seq + 1 >= 2], got shape {records.shape}")
    if records.min() < 0 or records.max() > np.iinfo(np.uint16).max:
        raise DataError("token ids must fit in uint16")
    os.makedirs(output, exist_ok=True)
    name = "tokens-00000.bin"
    with open(os.path.join(output, name), "wb") as f:
        f.write(records.astype("<u2").tobytes())
    n, record_len = records.shape
    index = {
        "format": FORMAT, "version": 1, "seq": record_len - 1, "record_len": record_len, "dtype": "uint16",
        "shards": [{"file": name, "records": n}], "num_records": n, "num_tokens": n * record_len,
        "num_documents": 0, "num_bytes": int(num_bytes), "dropped_tokens": 0, "eos_token_id": EOS_TOKEN_ID,
        "sources": [],
    }
    with open(os.path.join(output, INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return index
