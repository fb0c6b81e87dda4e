"""Teacher vectors, computed once and cached on disk in shards.

Layout of one teacher's cache (``<cache_dir>/teacher-vectors/<fingerprint>/``)::

    meta.json            teacher, settings, number of texts, shard size (written first)
    shard-00000.npy      float32 rows for texts [0, shard_size)
    shard-00001.npy      ...
    done.json            written last, once every shard exists: dimension and timings

The fingerprint hashes the teacher's files (whole contents: a change anywhere in a weight file counts), the texts
and the encoding settings, so any change gives a new folder and an identical rerun finds the finished one. File
digests are memoized in ``teacher-vectors/file-digests.json`` by path, size and modification time, so an unchanged
multi-GiB teacher is read only once. Each shard is written to a temporary file and renamed,
so an interrupted run (or a crashed worker process) loses only the shards it had not finished; a rerun
encodes just the missing ones. Several processes (one per GPU, or CPU processes) can share the work.

Under torchrun only the first process encodes; the others find the same folder from the same fingerprint, wait for
its ``done.json`` and read the shards (:func:`await_teacher`), so no two processes of a job write one cache.

Several teachers are combined as in Jasper: each teacher's rows are L2-normalized, multiplied by its weight,
concatenated, and the result normalized again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedforge.evaluation import l2_normalize
from embedforge.outputs import write_npy_atomic

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: teacher files are hashed whole (1 read only the first and last MiB of large files)
DIGESTS_FILE = "file-digests.json"
_CHUNK = 1 << 22
_SETTLED_NS = 2_000_000_000  # files older than this are memoized by size and modification time


def file_digest(path: str | os.PathLike[str], digests: dict[str, Any] | None = None) -> str:
    """The sha256 of a file's whole content.

    ``digests`` memoizes it across runs: an entry keyed by the absolute path is reused while the file's size and
    modification time (in ns) are unchanged, and (re)written otherwise, so a multi-GiB weight file is read once.
    A file modified in the last few seconds is not memoized: file times tick coarsely, so a second write within
    the same tick could keep size and time while changing the content.
    """
    f = Path(path).resolve()
    stat = f.stat()
    key = os.fspath(f)
    known = (digests or {}).get(key)
    if isinstance(known, dict) and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return str(known["sha256"])
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if digests is not None and time.time_ns() - stat.st_mtime_ns > _SETTLED_NS:
        digests[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    elif digests is not None:
        digests.pop(key, None)
    return digest


def _read_digests(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # a damaged memo only costs a re-hash
        logger.warning("ignoring unreadable file digest cache %s", path)
        return {}
    return data if isinstance(data, dict) else {}


def directory_fingerprint(path: str | os.PathLike[str], *, digest_cache: str | os.PathLike[str] | None = None,
                          update: bool = True) -> str:
    """A sha256 over a model directory's file names and whole contents.

    With ``digest_cache`` (a JSON file) each file's digest is memoized by path, size and modification time, so an
    unchanged teacher is not read again on the next run (see :func:`file_digest`); ``update=False`` only reads the
    memo (a process that must not write the cache).
    """
    root = Path(path)
    h = hashlib.sha256()
    if not root.is_dir():  # a hub id: the name is all we know
        h.update(os.fspath(path).encode())
        return h.hexdigest()
    memo_file = Path(digest_cache) if digest_cache is not None else None
    digests = _read_digests(memo_file)
    before = dict(digests)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel or rel == "embedforge.json":
            continue  # lineage records change with metrics; they say nothing about the vectors
        h.update(f"{rel}\0{f.stat().st_size}\0{file_digest(f, digests)}\0".encode())
    if memo_file is not None and update and digests != before:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic_json(memo_file, digests)
    return h.hexdigest()


def texts_fingerprint(texts: Sequence[str]) -> str:
    """A sha256 of the texts in order."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class EncodeSettings:
    """What, besides the teacher and the texts, decides the vectors."""

    max_seq_length: int = 128
    batch_size: int = 64
    prompt: str | None = None
    shard_size: int = 4096

    def key(self) -> dict[str, Any]:
        """The settings that change the vectors (batch size does not, up to float noise)."""
        return {"max_seq_length": self.max_seq_length, "prompt": self.prompt, "shard_size": self.shard_size}


@dataclass
class CacheReport:
    """What one :func:`encode_teacher` call did."""

    directory: Path
    n_texts: int
    dim: int
    teacher_fingerprint: str = ""
    """sha256 over the teacher's file names and contents (recorded in the distilled model's lineage)."""
    encoded_shards: list[int] = field(default_factory=list)
    reused_shards: list[int] = field(default_factory=list)
    seconds: float = 0.0


def cache_fingerprint(teacher: str | os.PathLike[str], texts: Sequence[str], settings: EncodeSettings, *,
                      teacher_fingerprint: str | None = None) -> str:
    """Fingerprint of (teacher files, texts, settings): the name of the cache folder.

    ``teacher_fingerprint`` is the teacher's :func:`directory_fingerprint` when the caller already has it.
    """
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "teacher": teacher_fingerprint or directory_fingerprint(teacher),
            "texts": texts_fingerprint(texts),
            "settings": settings.key(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.npy"


def _write_atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _load_teacher(teacher: str, settings: EncodeSettings, device: str | None) -> Any:
    """Load a teacher as a SentenceTransformer on ``device`` with the cache's max length."""
    from embedforge.model import load_model

    model = load_model(teacher, device=device or "cpu")
    model.max_seq_length = settings.max_seq_length
    model.eval()
    if settings.prompt:  # a prompt the teacher's pooling would cut one token too far: refuse before encoding
        from embedforge.modules.prompts import check_prompt_tokens, pools_without_prompt

        if pools_without_prompt(model):
            check_prompt_tokens(model[0].tokenizer, settings.prompt, "teacher_prompt")
    return model


def _encode_texts(model: Any, texts: list[str], settings: EncodeSettings) -> np.ndarray:
    """Encode one shard's texts (length-sorted batches) as normalized float32 rows."""
    from embedforge.evaluation import encode

    return np.ascontiguousarray(encode(model, texts, batch_size=settings.batch_size, prompt=settings.prompt,
                                       normalize=True, show_progress=False), dtype=np.float32)


# ------------------------------------------------------------------------------------- worker processes

_WORKER: dict[str, Any] = {}


def _worker_init(teacher: str, settings: EncodeSettings, devices: Any, threads: int) -> None:
    """Runs once in each worker process: pick a device, load the teacher there."""
    import torch

    torch.set_num_threads(max(1, threads))
    device = devices.get() if devices is not None else "cpu"
    _WORKER["model"] = _load_teacher(teacher, settings, device)
    _WORKER["settings"] = settings


def _worker_encode(index: int, texts: list[str], directory: str) -> tuple[int, int]:
    """Encode one shard in a worker process and write it; returns (shard index, number of texts)."""
    vectors = _encode_texts(_WORKER["model"], texts, _WORKER["settings"])
    write_npy_atomic(_shard_path(Path(directory), index), vectors)
    return index, len(texts)


def _devices(processes: int) -> list[str]:
    """One CUDA device per process where there are GPUs, else CPU for all."""
    import torch

    n_gpu = torch.cuda.device_count()
    if n_gpu > 0:
        return [f"cuda:{i % n_gpu}" for i in range(processes)]
    return ["cpu"] * processes


def encode_teacher(
    teacher: str,
    texts: Sequence[str],
    cache_dir: str | os.PathLike[str],
    settings: EncodeSettings | None = None,
    *,
    processes: int = 1,
    show_progress: bool = True,
) -> CacheReport:
    """Encode ``texts`` with ``teacher`` into the shard cache, reusing whatever shards already exist.

    With ``processes > 1`` the shards are spread over worker processes (spawned; one per GPU when there are
    GPUs), each of which loads the teacher once and writes every shard it finishes on its own.
    """
    from tqdm.auto import tqdm

    from embedforge.sources import resolve_source

    settings = settings or EncodeSettings()
    teacher = os.fspath(resolve_source(teacher))
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to encode")
    start = time.perf_counter()
    root = Path(cache_dir) / "teacher-vectors"
    fingerprint = directory_fingerprint(teacher, digest_cache=root / DIGESTS_FILE)
    directory = root / cache_fingerprint(teacher, texts, settings, teacher_fingerprint=fingerprint)
    directory.mkdir(parents=True, exist_ok=True)
    n_shards = (len(texts) + settings.shard_size - 1) // settings.shard_size
    meta = {"teacher": os.fspath(teacher), "teacher_fingerprint": fingerprint, "n_texts": len(texts),
            "n_shards": n_shards, "settings": settings.key(), "version": CACHE_VERSION}
    if not (directory / "meta.json").is_file():
        _write_atomic_json(directory / "meta.json", meta)

    def shard_texts(i: int) -> list[str]:
        return texts[i * settings.shard_size:(i + 1) * settings.shard_size]

    todo = [i for i in range(n_shards) if not _shard_path(directory, i).is_file()]
    report = CacheReport(directory=directory, n_texts=len(texts), dim=0, teacher_fingerprint=fingerprint,
                         reused_shards=[i for i in range(n_shards) if i not in set(todo)])
    if todo:
        logger.info("teacher %s: encoding %d of %d shards into %s", teacher, len(todo), n_shards, directory)
        bar = tqdm(total=sum(len(shard_texts(i)) for i in todo), desc="teacher vectors", unit="text",
                   disable=not show_progress, smoothing=0.1)
        if processes <= 1:
            model = _load_teacher(teacher, settings, _devices(1)[0])
            for i in todo:
                write_npy_atomic(_shard_path(directory, i), _encode_texts(model, shard_texts(i), settings))
                report.encoded_shards.append(i)
                bar.update(len(shard_texts(i)))
        else:
            report.encoded_shards = _encode_parallel(teacher, settings, directory, todo, shard_texts,
                                                     processes, bar)
        bar.close()
    first = np.load(_shard_path(directory, 0), mmap_mode="r")
    report.dim = int(first.shape[1])
    report.seconds = time.perf_counter() - start
    if report.encoded_shards or not (directory / "done.json").is_file():
        _write_atomic_json(directory / "done.json", {**meta, "dim": report.dim,
                                                     "seconds": round(report.seconds, 2)})
    return report


def _encode_parallel(teacher: str, settings: EncodeSettings, directory: Path, todo: list[int],
                     shard_texts: Any, processes: int, bar: Any) -> list[int]:
    """Spread shards over ``processes`` spawned workers; returns the shards they finished, in order."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")
    devices = ctx.Queue()
    for d in _devices(processes):
        devices.put(d)
    threads = max(1, (os.cpu_count() or 1) // processes)
    done: list[int] = []
    with ProcessPoolExecutor(max_workers=processes, mp_context=ctx, initializer=_worker_init,
                             initargs=(teacher, settings, devices, threads)) as pool:
        futures = [pool.submit(_worker_encode, i, shard_texts(i), os.fspath(directory)) for i in todo]
        for fut in as_completed(futures):
            index, n = fut.result()  # a crashed worker raises here; finished shards stay on disk
            done.append(index)
            bar.update(n)
    return sorted(done)


def await_teacher(teacher: str, texts: Sequence[str], cache_dir: str | os.PathLike[str],
                  settings: EncodeSettings | None = None, *, timeout_s: float | None = None,
                  poll_s: float = 1.0) -> CacheReport:
    """Wait until another process (the first of a torchrun job) has finished ``teacher``'s cache for ``texts``,
    then report it like :func:`encode_teacher` would; writes nothing.

    Waits ``timeout_s`` at most (default ``$EMBEDFORGE_RANK_WAIT_S``, else 24 hours), then raises
    :class:`~embedforge.errors.RunError`.
    """
    from embedforge.errors import RunError
    from embedforge.training.engine import wait_until
    from embedforge.sources import resolve_source

    settings = settings or EncodeSettings()
    teacher = os.fspath(resolve_source(teacher))
    texts = list(texts)
    start = time.perf_counter()
    root = Path(cache_dir) / "teacher-vectors"
    fingerprint = directory_fingerprint(teacher, digest_cache=root / DIGESTS_FILE, update=False)
    directory = root / cache_fingerprint(teacher, texts, settings, teacher_fingerprint=fingerprint)
    done = directory / "done.json"
    logger.info("teacher %s: waiting for the first process to finish its vectors in %s", teacher, directory)
    late = wait_until(done.is_file, timeout_s, poll_s)
    if late is not None:
        raise RunError(f"{directory}: the teacher vectors of {teacher} were not finished by the first process "
                       f"within {late:.0f} s; check its log, or raise EMBEDFORGE_RANK_WAIT_S")
    meta = json.loads(done.read_text())
    return CacheReport(directory=directory, n_texts=len(texts), dim=int(meta["dim"]),
                       teacher_fingerprint=fingerprint, reused_shards=list(range(int(meta["n_shards"]))),
                       seconds=time.perf_counter() - start)


def load_vectors(directory: str | os.PathLike[str]) -> np.ndarray:
    """All rows of one finished teacher cache, in text order (float32)."""
    d = Path(directory)
    done = d / "done.json"
    if not done.is_file():
        raise FileNotFoundError(f"{d}: teacher cache is not complete (no done.json); rerun the encoding")
    n_shards = json.loads(done.read_text())["n_shards"]
    return np.concatenate([np.load(_shard_path(d, i)) for i in range(n_shards)]).astype(np.float32, copy=False)


def combine_teachers(vectors: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Jasper's multi-teacher target: normalize each teacher's rows, scale by its weight, concatenate, renormalize."""
    if not vectors:
        raise ValueError("no teacher vectors")
    weights = list(weights) if weights else [1.0] * len(vectors)
    if len(weights) != len(vectors):
        raise ValueError(f"{len(weights)} weights for {len(vectors)} teachers")
    n = {v.shape[0] for v in vectors}
    if len(n) != 1:
        raise ValueError(f"teachers disagree on the number of rows: {sorted(n)}")
    parts = [w * l2_normalize(v) for v, w in zip(vectors, weights)]
    return l2_normalize(np.concatenate(parts, axis=1).astype(np.float32))


def teacher_targets(
    teachers: Sequence[str],
    texts: Sequence[str],
    cache_dir: str | os.PathLike[str],
    settings: EncodeSettings | None = None,
    *,
    weights: Sequence[float] | None = None,
    processes: int = 1,
    show_progress: bool = True,
    encode: bool = True,
) -> tuple[np.ndarray, list[CacheReport]]:
    """Encode (or reuse) every teacher's vectors and combine them; returns (targets, one report per teacher).

    ``encode=False`` (every torchrun process but the first) writes nothing: it waits for each teacher's cache to be
    finished by the process that encodes it (:func:`await_teacher`) and reads it."""
    if encode:
        reports = [encode_teacher(t, texts, cache_dir, settings, processes=processes, show_progress=show_progress)
                   for t in teachers]
    else:
        reports = [await_teacher(t, texts, cache_dir, settings) for t in teachers]
    vectors = [load_vectors(r.directory) for r in reports]
    return combine_teachers(vectors, weights), reports
