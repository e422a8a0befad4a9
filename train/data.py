"""Training data: token windows in a deterministic, resumable order, and a held-out split.

Sources (``--data``):

- ``builtin`` (default, offline): the docstrings of the Python standard library on this
  machine (read with ``ast`` from the source files, nothing imported), about 1.5 MB of English
  technical prose. Built once into a cache (``$LOWMEM_OPTIM_CACHE`` or
  ``~/.cache/lowmem_optim``), documents shuffled with a fixed seed so the held-out split mixes
  modules. It depends on the Python version, which the cache file's name records.
- a ``.txt``/``.jsonl`` file or a folder of them: each .txt file is a document, each .jsonl line
  a document (its ``"text"`` field). Files are read in sorted path order.
- ``c4``: allenai/c4 ``en`` streamed through ``datasets`` (needs the network), shuffled with
  the seed (buffer 10,000 documents), t5-base tokenizer by default, as GaLore trained.

Documents are tokenized, each followed by the tokenizer's end-of-document id, and packed into
windows of ``seq_len`` tokens. Local corpora: the last ``val_fraction`` of the tokens is held
out; the training windows are visited in a fresh permutation each epoch, drawn from a generator
seeded with (seed, epoch). The data position is the number of windows consumed by all ranks
together; a run resumed at position p sees exactly the batches an uninterrupted run sees after p.
Under data parallelism each global micro-batch of ``batch_size x world`` windows is cut into
per-rank slices, so the order does not depend on the number of processes' layout.

The training stream is read ahead (:class:`Prefetched`): a background thread assembles the next
micro-batches in pinned memory while the device computes, and each is copied to the device
without blocking the host; its position is that of the batches handed out, so resuming is
unchanged.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import queue
import random
import sys
import sysconfig
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from train.config import TrainConfig

#: stdlib folders that hold tests, GUIs or vendored code rather than documentation
_STDLIB_SKIP = frozenset(
    {"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip", "__pycache__"}
)
_MIN_DOC_CHARS = 40


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_token_id: int

    def encode(self, text: str) -> torch.Tensor: ...

    def save_pretrained(self, folder: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255 and 256 as end of document: needs no download and no training."""

    name = "bytes"
    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> torch.Tensor:
        data = text.encode("utf-8")
        return (
            torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32)
            if data
            else torch.empty(0, dtype=torch.int32)
        )

    def save_pretrained(self, folder: str | Path) -> None:
        """Write this tokenizer as a ``transformers`` fast tokenizer (``tokenizer.json`` and
        ``tokenizer_config.json``) that gives the same ids: a byte-level BPE without merges
        whose 256 base tokens are the bytes (id = byte value), and :data:`BYTE_EOS_TOKEN` as
        id 256, the end of document, which is never split out of a text (``split_special_tokens``):
        a document holding its spelling is encoded as bytes, as here.
        ``AutoTokenizer.from_pretrained(folder)`` loads it."""
        from tokenizers import Tokenizer as FastTokenizer
        from tokenizers import decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        shown = _byte_level_alphabet()
        fast = FastTokenizer(models.BPE({shown[b]: b for b in range(256)}, [], ignore_merges=True))
        fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        fast.decoder = decoders.ByteLevel()
        fast.add_special_tokens([BYTE_EOS_TOKEN])  # the next id: 256
        PreTrainedTokenizerFast(
            tokenizer_object=fast, eos_token=BYTE_EOS_TOKEN, split_special_tokens=True
        ).save_pretrained(str(folder))


#: the text of the byte tokenizer's end-of-document id in its ``transformers`` form
BYTE_EOS_TOKEN = "<|end_of_document|>"


def _byte_level_alphabet() -> list[str]:
    """The character that stands for each byte in byte-level BPE (GPT-2's convention, which
    ``tokenizers``' ByteLevel pre-tokenizer applies): printable Latin-1 bytes stand for
    themselves, the other 68 for the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in shown:
            shown[b], extra = chr(256 + extra), extra + 1
    return [shown[b] for b in range(256)]


class HFTokenizer:
    """A ``transformers`` tokenizer by hub name or local path (t5-base for C4, as GaLore)."""

    def __init__(self, name: str) -> None:
        from transformers import AutoTokenizer

        self.name = name
        try:
            self._tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:  # not on the hub, not cached offline, not a tokenizer folder
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"--tokenizer {name!r} could not be loaded ({type(err).__name__}: {first}) (allowed: "
                "bytes, or an HF tokenizer name or local path that is cached or downloadable)"
            ) from err
        self.vocab_size = len(self._tok)
        if self._tok.eos_token_id is None:
            raise ValueError(f"--tokenizer {name!r} has no end-of-sequence token; documents could not be separated")
        self.eos_token_id = self._tok.eos_token_id

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self._tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int32)

    def save_pretrained(self, folder: str | Path) -> None:
        self._tok.save_pretrained(str(folder))


def load_tokenizer(name: str) -> Tokenizer:
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)


def folder_tokenizer(folder: str | Path) -> str | None:
    """``folder`` as a tokenizer name when it holds a saved HF tokenizer, else None."""
    return str(folder) if (Path(folder) / "tokenizer_config.json").is_file() else None


def run_tokenizer(settings: dict[str, Any]) -> str:
    """The tokenizer of a run with these settings (``TrainConfig.to_dict()``): ``--tokenizer``,
    else the ``--init-from`` folder's when it has one, else the data's default (t5-base for c4,
    as GaLore; bytes otherwise)."""
    init_from = settings.get("init_from")
    return (
        settings.get("tokenizer")
        or (folder_tokenizer(init_from) if init_from else None)
        or ("t5-base" if settings["data"] == "c4" else "bytes")
    )


# ---- the built-in corpus --------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("LOWMEM_OPTIM_CACHE", Path.home() / ".cache" / "lowmem_optim"))


def _stdlib_docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _STDLIB_SKIP and not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                tree = ast.parse(Path(folder, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):  # a few stdlib files are templates or legacy encodings
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= _MIN_DOC_CHARS:
                        docs.append(doc)
    random.Random(0).shuffle(docs)  # fixed seed: the same corpus and split on every run
    return docs


def builtin_corpus() -> Path:
    """The cached .jsonl of the built-in corpus, built on first use (atomically: concurrent
    first runs each write a private temp file and the last rename wins, with equal content)."""
    v = sys.version_info
    path = cache_dir() / f"stdlib_docstrings_py{v.major}.{v.minor}.{v.micro}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            for doc in _stdlib_docstrings():
                out.write(json.dumps({"text": doc}) + "\n")
        os.replace(tmp, path)
    return path


# ---- local files ----------------------------------------------------------------------------
def _text_files(path: Path) -> list[Path]:
    """The files of a folder (regular files only) or the file itself; ValueError for anything
    else, e.g. a FIFO or a device such as /dev/zero, whose reading would block or never end."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
    if path.exists() and not path.is_file():
        raise ValueError(
            f"--data {str(path)!r} is not a regular file (a FIFO or a device would block or never end; "
            "allowed: builtin, c4, or a .txt/.jsonl file or folder)"
        )
    return [path]


def read_documents(path: str | Path) -> list[str]:
    """Documents of a .txt/.jsonl file or of a folder of them (sorted by path)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--data {str(path)!r} does not exist (allowed: builtin, c4, or a .txt/.jsonl file or folder)")
    files = _text_files(path)
    if not files or any(f.suffix not in (".txt", ".jsonl") for f in files):
        raise ValueError(
            f"--data {str(path)!r} holds no .txt or .jsonl file (allowed: a .txt/.jsonl file or a folder of them)"
        )
    docs: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--data: cannot read {str(f)!r} as UTF-8 text: {err}") from err
        if f.suffix == ".txt":
            docs.append(text)
            continue
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    doc = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"--data: {str(f)!r} line {line_no} is not a JSON object with a 'text' field"
                    ) from err
                if not isinstance(doc, str):
                    raise ValueError(
                        f"--data: {str(f)!r} line {line_no}: 'text' is {type(doc).__name__} "
                        f"{str(doc)[:40]!r} (allowed: a string)"
                    )
                docs.append(doc)
    return docs


def fingerprint(source: str) -> str:
    """What ``--resume`` compares to know the data is the same: per file read (sorted, names
    relative to ``source``), its size and the SHA-256 of its first 64 MiB (the whole file when
    smaller); the built-in corpus by its cache file; ``c4`` by name (a remote dataset)."""
    if source == "c4":
        return "c4"
    path = builtin_corpus() if source == "builtin" else Path(source)
    if not path.exists():
        return f"missing:{source}"
    digest = hashlib.sha256()
    for f in _text_files(path):
        digest.update(f"{f.relative_to(path) if path.is_dir() else ''}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as handle:
            digest.update(handle.read(64 * 2**20))
    return f"sha256:{digest.hexdigest()[:16]}"


def pack(docs: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """All documents as one token stream, each followed by the end-of-document id."""
    eos = torch.tensor([tokenizer.eos_token_id], dtype=torch.int32)
    return torch.cat([t for doc in docs for t in (tokenizer.encode(doc), eos)])


# ---- batches ----------------------------------------------------------------------------------
class TrainStream(Protocol):
    position: int

    def next_batch(self) -> torch.Tensor:
        """This rank's micro-batch, (batch_size, seq_len) int64."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShuffledWindows:
    """Non-overlapping windows of a token tensor, a new seeded permutation every epoch."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.windows = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.position = 0
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.int64)

    def _window(self, position: int) -> torch.Tensor:
        epoch, offset = divmod(position, len(self.windows))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.windows), generator=generator)
        return self.windows[self._order[offset]]

    def next_batch(self) -> torch.Tensor:
        start = self.position + self.rank * self.batch_size
        batch = torch.stack([self._window(start + i) for i in range(self.batch_size)])
        self.position += self.batch_size * self.world
        return batch.long()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def _pack_windows(docs: Iterator[str], tokenizer: Tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    buffer = torch.empty(0, dtype=torch.int32)
    eos = torch.tensor([tokenizer.eos_token_id], dtype=torch.int32)
    for doc in docs:
        buffer = torch.cat([buffer, tokenizer.encode(doc), eos])
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]


class C4Stream:
    """allenai/c4 en, streamed and packed; resuming re-reads and skips the consumed windows."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.position = 0
        self._windows = self._open()

    def _open(self) -> Iterator[torch.Tensor]:
        dataset = _c4("train").shuffle(seed=self.seed, buffer_size=10_000)
        return _pack_windows((row["text"] for row in dataset), self.tokenizer, self.seq_len)

    def next_batch(self) -> torch.Tensor:
        windows = [next(self._windows) for _ in range(self.batch_size * self.world)]
        self.position += len(windows)
        mine = windows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return torch.stack(mine).long()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._windows = self._open()
        for _ in range(int(state["position"])):
            next(self._windows)
        self.position = int(state["position"])


def _c4(split: str) -> Any:
    try:
        from datasets import load_dataset

        return load_dataset("allenai/c4", "en", split=split, streaming=True)
    except Exception as err:  # no datasets package, no network, hub refusal: all mean "not here"
        raise ValueError(
            f"--data c4 needs the datasets package and access to the Hugging Face hub ({type(err).__name__}: "
            f"{err}) (allowed offline: --data builtin, or a .txt/.jsonl file or folder)"
        ) from err


def c4_validation(tokenizer: Tokenizer, seq_len: int, n_windows: int) -> torch.Tensor:
    windows = _pack_windows((row["text"] for row in _c4("validation")), tokenizer, seq_len)
    return torch.stack([next(windows) for _ in range(n_windows)])


def _read_ahead(stream: TrainStream, out: queue.Queue, stop: threading.Event, pin: bool) -> None:
    """The read-ahead thread of :class:`Prefetched`: (batch, stream position after it) into
    ``out`` until ``stop``; an error goes into ``out`` too, for the consumer to raise."""
    try:
        while not stop.is_set():
            batch = stream.next_batch()
            item = (batch.pin_memory() if pin else batch, stream.position)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except BaseException as err:
        out.put((err, None))


class Prefetched:
    """``stream`` read ``depth`` micro-batches ahead by a background thread, in pinned memory
    (on CUDA) and handed out on ``device`` (copied without blocking the host). ``position`` and
    ``state_dict`` count the batches handed out, not those read ahead; ``load_state_dict``
    drops the read-ahead and moves the stream."""

    def __init__(self, stream: TrainStream, device: torch.device | str = "cpu", depth: int = 2) -> None:
        self.stream, self.device, self.depth = stream, torch.device(device), depth
        self.position = stream.position
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ahead = False  # the stream stands past ``position`` (batches read ahead, then dropped)

    def next_batch(self) -> torch.Tensor:
        if self._thread is None:
            if self._ahead:
                self.stream.load_state_dict(self.state_dict())
                self._ahead = False
            self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
            # the thread holds the stream, not this object: dropping the object stops it
            self._thread = threading.Thread(
                target=_read_ahead,
                daemon=True,
                name="train-data-prefetch",
                args=(self.stream, self._queue, self._stop, self.device.type == "cuda"),
            )
            self._thread.start()
        batch, position = self._queue.get()
        if position is None:
            self.close()
            raise batch
        self.position = position
        return batch.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the thread and drop the read-ahead (a later ``next_batch`` resumes at ``position``)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._ahead = None, True

    def __del__(self) -> None:
        self._stop.set()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self.position, self._ahead = self.stream.position, False


# ---- wiring -----------------------------------------------------------------------------------
@dataclass
class Data:
    train: TrainStream
    val: list[torch.Tensor]  # this rank's validation micro-batches, the same at every evaluation
    tokenizer: Tokenizer


def _val_batches(windows: torch.Tensor, batch_size: int, n_batches: int, rank: int, world: int) -> list[torch.Tensor]:
    per_step = batch_size * world
    n = min(n_batches, len(windows) // per_step)
    if n == 0:
        raise ValueError(
            f"the validation split has {len(windows)} windows, fewer than --batch-size x processes "
            f"= {per_step}; lower --batch-size or --seq-len, or raise --val-fraction"
        )
    return [windows[k * per_step + rank * batch_size : k * per_step + (rank + 1) * batch_size].long() for k in range(n)]


def build_data(
    source: str,
    tokenizer_name: str | None,
    seq_len: int,
    batch_size: int,
    *,
    seed: int,
    val_fraction: float,
    eval_batches: int,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str | None = None,
) -> Data:
    """The training stream and validation batches of ``source`` for this rank; with ``device``
    the stream is read ahead and hands out batches there (:class:`Prefetched`)."""
    data = _build_data(
        source,
        tokenizer_name,
        seq_len,
        batch_size,
        seed=seed,
        val_fraction=val_fraction,
        eval_batches=eval_batches,
        rank=rank,
        world=world,
    )
    if device is not None:
        data.train = Prefetched(data.train, device)
    return data


def run_data(cfg: TrainConfig, rank: int = 0, world: int = 1, device: torch.device | str | None = None) -> Data:
    """The data as ``python -m train`` builds it from ``cfg`` for ``rank`` of ``world`` (:func:`build_data`)."""
    return build_data(
        cfg.data,
        run_tokenizer(cfg.to_dict()),
        cfg.seq_len,
        cfg.batch_size,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        eval_batches=cfg.eval_batches,
        rank=rank,
        world=world,
        device=device,
    )


def _build_data(
    source: str,
    tokenizer_name: str | None,
    seq_len: int,
    batch_size: int,
    *,
    seed: int,
    val_fraction: float,
    eval_batches: int,
    rank: int,
    world: int,
) -> Data:
    tokenizer = load_tokenizer(tokenizer_name or run_tokenizer({"data": source}))
    if source == "c4":
        val = c4_validation(tokenizer, seq_len, eval_batches * batch_size * world)
        train = C4Stream(tokenizer, seq_len, batch_size, seed, rank, world)
        return Data(train, _val_batches(val, batch_size, eval_batches, rank, world), tokenizer)
    docs = read_documents(builtin_corpus() if source == "builtin" else source)
    tokens = pack(docs, tokenizer)
    split = int(len(tokens) * (1 - val_fraction))
    train_tokens, val_tokens = tokens[:split], tokens[split:]
    if len(train_tokens) < seq_len * batch_size * world:
        raise ValueError(
            f"--data {source!r} has {len(train_tokens)} training tokens, fewer than one step needs "
            f"(--batch-size x processes x --seq-len = {seq_len * batch_size * world})"
        )
    val_windows = val_tokens[: len(val_tokens) // seq_len * seq_len].view(-1, seq_len)
    return Data(
        ShuffledWindows(train_tokens, seq_len, batch_size, seed, rank, world),
        _val_batches(val_windows, batch_size, eval_batches, rank, world),
        tokenizer,
    )
