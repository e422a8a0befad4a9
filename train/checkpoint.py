"""Checkpoints: one file per saved step, checksummed, written atomically, read with ``weights_only=True``.

``<output-dir>/checkpoints/step_00001000.pt`` holds the step, model, optimizer (with any
layer-wise state), scheduler, data position, RNG states, the run's config, the model config's
contents and a fingerprint of the data. Next to it, ``step_00001000.pt.sha256`` holds the
SHA-256 of the file in ``sha256sum`` format (``sha256sum -c`` checks it by hand).

Writing: the checkpoint goes to a temporary file in the same folder, hashed as it is written,
and is fsynced; the checksum file is written the same way; then the checkpoint is renamed over
its final name (``os.replace`` is atomic on POSIX) and read back against its checksum. Only
after that are older checkpoints deleted (all but the newest ``keep``), so a run killed or
failing at any point (a full disk, a read-only folder) leaves the previous checkpoints intact,
and a half-written file is never a ``step_*.pt``. Temporary files of killed writes are removed
when the next run starts in that folder (:func:`remove_stale`).

Reading: :func:`load` verifies the checksum first; a mismatch or a missing checksum file is a
ValueError naming the file. :func:`newest_intact` is what ``--resume`` takes: the newest
checkpoint whose checksum matches, skipping (and naming, never deleting) newer corrupt ones.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch

_NAME = re.compile(r"step_(\d+)\.pt")
_CHUNK = 16 * 2**20
#: what every checkpoint of this loop holds
KEYS = frozenset(
    {"step", "model", "optimizer", "scheduler", "data", "rng", "config", "model_config", "data_fingerprint"}
)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def path_of(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written."""
    return checkpoint_dir(output_dir) / f"step_{step:08d}.pt"


def step_of(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))


def saved(output_dir: str | Path) -> list[Path]:
    """The checkpoints in ``output_dir``, oldest first (temporary files excluded)."""
    folder = checkpoint_dir(output_dir)
    return sorted((p for p in folder.glob("step_*.pt") if _NAME.fullmatch(p.name)), key=step_of)


def latest(output_dir: str | Path) -> Path | None:
    found = saved(output_dir)
    return found[-1] if found else None


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def remove_stale(output_dir: str | Path) -> list[Path]:
    """Delete the temporary files of writes that were killed midway; returns them."""
    stale = sorted(checkpoint_dir(output_dir).glob(".step_*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class _HashingWriter:
    """A file's ``write`` that hashes the bytes on their way and keeps the first OSError:
    torch's zip writer turns a failed write (a full disk) into an unhelpful RuntimeError."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.sha256, self.error = file, hashlib.sha256(), None

    def write(self, data: bytes) -> int:
        try:
            written = self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.sha256.update(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def _write_synced(tmp: Path, write: Any) -> None:
    """``write(file)`` into ``tmp`` and fsync it; ``tmp`` never survives a failure."""
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before a rename makes them a checkpoint
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def save(output_dir: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` as the checkpoint of ``step``, verify it, then drop all but the newest
    ``keep``. A failed write (full disk, no permission) is an OSError with one line naming the
    file; the previous checkpoints are untouched."""
    folder = checkpoint_dir(output_dir)
    path = path_of(output_dir, step)
    tmp, tmp_sum = (folder / f".{name}.{os.getpid()}.tmp" for name in (path.name, checksum_path(path).name))
    writer: _HashingWriter | None = None

    def write_checkpoint(f: BinaryIO) -> None:
        nonlocal writer
        writer = _HashingWriter(f)
        torch.save(payload, writer)

    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_synced(tmp, write_checkpoint)
        _write_synced(tmp_sum, lambda f: f.write(f"{writer.sha256.hexdigest()}  {path.name}\n".encode()))
        os.replace(tmp_sum, checksum_path(path))
        os.replace(tmp, path)
        _fsync_dir(folder)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        tmp_sum.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else err
        if not isinstance(cause, OSError):
            raise
        raise OSError(
            cause.errno,
            f"could not write checkpoint {str(path)!r} ({cause.strerror or cause}); "
            "the previous checkpoints are intact",
        ) from err
    verify(path)
    older = [p for p in saved(output_dir) if step_of(p) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        old.unlink()
        checksum_path(old).unlink(missing_ok=True)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (a crash right after could otherwise undo them)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: Path) -> None:
    """ValueError naming ``path`` unless its bytes match its checksum file."""
    recorded = checksum_path(path)
    try:
        expected = recorded.read_text().split()[0]
    except (OSError, IndexError) as err:
        raise ValueError(
            f"checkpoint {str(path)!r} has no readable checksum file ({recorded.name}), so it cannot be "
            "verified; it was left as is"
        ) from err
    if file_sha256(path) != expected:
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupt: its contents do not match the SHA-256 in "
            f"{recorded.name}. It was left as is; --resume takes the newest intact checkpoint"
        )


def newest_intact(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that passes :func:`verify`, and the reasons each newer one failed.
    ValueError listing every failure when checkpoints exist but none is intact."""
    failures: list[str] = []
    for path in reversed(saved(output_dir)):
        try:
            verify(path)
        except ValueError as err:
            failures.append(str(err))
            continue
        return path, failures
    if failures:
        raise ValueError(f"no intact checkpoint in {str(checkpoint_dir(output_dir))!r}: " + " | ".join(failures))
    return None, []


def load(path: Path, *, verified: bool = False, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` (its checksum verified unless ``verified``); ValueError
    naming the file when it cannot be trusted or read. ``mmap``: tensors are read from the
    file when used, not all at once."""
    if not verified:
        verify(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # bad pickle, foreign objects: all mean "unusable"
        raise ValueError(
            f"checkpoint {str(path)!r} is unreadable ({type(err).__name__}: {err}). It was left as is; "
            "move it away to resume from the checkpoint before it, or start a new --output-dir"
        ) from err
    missing = KEYS - set(payload) if isinstance(payload, dict) else KEYS
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {sorted(missing)}; it was not written by this training loop")
    return payload


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
