"""Pooled vectors of a frozen language tower, computed once per distinct text and kept on disk.

With a frozen language tower, stage 1 needs its output for every row only once, and encoding is the only
expensive part. `FrozenEncoder` holds the tower for that job: loaded once, fingerprinted once, on one device
(the trainer's accelerator, or the CPU) in one precision. `TextVectorCache.build` encodes each distinct
(user sentence, item sentence) pair once and stores the vectors under a key that fingerprints everything
they depend on: the model's config and weights, the tokenizer, pooling, max_length, precision and the texts.

Layout of one cache entry, a directory named by its key:

    text-vectors/<key[:32]>/vectors.npy   D x H float32, one row per distinct text, in sorted text order
    text-vectors/<key[:32]>/meta.json     key, rows, dim, precision, sha256 of vectors.npy

Encoding streams: texts are tokenized chunk by chunk (the next chunk on a thread while the model runs on
this one) and each chunk's vectors go straight into a memory-mapped file, so memory does not grow with the
number of texts. Under data parallelism every rank encodes one contiguous shard of the distinct texts and
rank 0 joins the shards into the one entry every rank then reads, memory-mapped. Entries are written to a
temporary directory and renamed; a damaged entry (checksum, size or key) is reported and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from tabular2text.atomic import atomic_path
from towers.language import LanguageTower

CACHE_VERSION = 2  # bump when tokenization, pooling or the file layout change what a key stands for
Precision = Literal["auto", "fp32", "bf16"]
Texts = Sequence[str] | Sequence[tuple[str, str]]


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively (CUDA with bf16; a CPU with AMX or AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: be conservative, fp32 is never wrong
            return False
        return " amx_bf16" in flags or " avx512_bf16" in flags
    return False


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """"auto": bf16 weights where the device has native bf16 (cosine >= 0.9999 to fp32, about 3x faster on
    an AMX CPU; benchmarks/encode_speed.md), fp32 elsewhere, where emulated bf16 would be slower."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown text precision {precision!r}; use auto, fp32 or bf16")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def model_fingerprint(tower: LanguageTower) -> str:
    """sha256 of the model class, its config (without its path) and every weight and buffer."""
    config = tower.model.config.to_dict()
    config.pop("_name_or_path", None)  # the same model moved to another folder is the same model
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    h = hashlib.sha256(type(tower.model).__name__.encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in tower.model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def tokenizer_fingerprint(tower: LanguageTower) -> str:
    """sha256 of the files the tokenizer saves (vocabulary, merges, normalisation, special tokens, sides)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tower.tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if path.name == "tokenizer.json":
                # The backend records the padding/truncation of its last call; that is state, not identity.
                backend = json.loads(data)
                backend["padding"] = backend["truncation"] = None
                data = json.dumps(backend, sort_keys=True).encode()
            h.update(path.relative_to(tmp).as_posix().encode() + b"\0")
            h.update(data)
    return h.hexdigest()


class FrozenEncoder:
    """A frozen language tower prepared for bulk encoding on one device in one precision.

    Args:
        tower: a frozen language tower (trainable_layers=0); it is fingerprinted in fp32, then moved.
        device: where the forward passes run, e.g. the trainer's root device.
        precision: "auto" (bf16 weights where the device has native bf16, else fp32), "fp32" or "bf16".
        batch_size: texts per forward pass (64 measured fastest on a 2-core AMX CPU).
        chunk_size: texts tokenized at once; bounds the memory of the token ids.
        pad_multiple: each batch is padded to a multiple of this many tokens: fewer distinct shapes for
            the kernels to prepare, at little padding.

    Attributes:
        fingerprint: sha256 of the model, tokenizer, pooling, max_length and precision; computed once.
        output_dim: H, the width of the vectors.
    """

    def __init__(self, tower: LanguageTower, device: torch.device | str = "cpu", precision: Precision = "auto",
                 batch_size: int = 64, chunk_size: int = 4096, pad_multiple: int = 16) -> None:
        if tower.trainable:
            raise ValueError("only a frozen language tower's vectors can be cached; use trainable_layers=0")
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size, self.chunk_size, self.pad_multiple = batch_size, chunk_size, pad_multiple
        settings = {"version": CACHE_VERSION, "pooling": tower.pooling, "max_length": tower.max_length,
                    "precision": self.precision}
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        h.update(model_fingerprint(tower).encode())  # of the fp32 weights as loaded, before any cast
        h.update(tokenizer_fingerprint(tower).encode())
        self.fingerprint = h.hexdigest()
        self.tower = tower.eval().to(self.device, torch.bfloat16 if self.precision == "bf16" else torch.float32)
        self.output_dim: int = tower.output_dim

    def _tokenized_chunks(self, first: Sequence[str], second: Sequence[str] | None) -> Iterator[dict]:
        """Token ids of consecutive chunks; the next chunk is tokenized on a thread while this one encodes."""
        def tokenize(start: int) -> dict:
            stop = start + self.chunk_size
            return dict(self.tower.tokenize(list(first[start:stop]),
                                            None if second is None else list(second[start:stop])))

        starts = range(0, len(first), self.chunk_size)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(tokenize, starts[0]) if starts else None
            for i in range(len(starts)):
                enc = pending.result()
                pending = pool.submit(tokenize, starts[i + 1]) if i + 1 < len(starts) else None
                yield enc

    def encode_into(self, out: np.ndarray, first: Sequence[str], second: Sequence[str] | None = None,
                    progress: bool = True) -> None:
        """Write the N x H float32 vectors of N texts (or pairs) into `out`, in input order.

        Args:
            out: an N x H float32 array, e.g. a memory-mapped file.
            first: N user sentences (or whole texts when `second` is None).
            second: N item sentences, or None.
            progress: show a progress bar.
        """
        n = len(first)
        with torch.inference_mode(), tqdm(total=n, unit="text", desc="encoding texts", disable=not progress) as bar:
            for chunk, enc in enumerate(self._tokenized_chunks(first, second)):
                lengths = enc["attention_mask"].sum(1)
                # Longest first: similar lengths share a batch, so little compute goes to padding.
                order = torch.argsort(lengths, descending=True, stable=True)
                base = chunk * self.chunk_size
                for start in range(0, len(order), self.batch_size):
                    rows = order[start:start + self.batch_size]
                    width = -(-int(lengths[rows].max()) // self.pad_multiple) * self.pad_multiple
                    batch = {k: v[rows, :width].to(self.device) for k, v in enc.items()}
                    vectors = self.tower(**batch).float().cpu().numpy()
                    out[(base + rows).numpy()] = vectors
                    bar.update(len(rows))

    def encode(self, first: Sequence[str], second: Sequence[str] | None = None,
               progress: bool = False) -> torch.Tensor:
        """N x H float32 vectors of N texts (or pairs), in memory."""
        out = np.empty((len(first), self.output_dim), dtype=np.float32)
        self.encode_into(out, first, second, progress)
        return torch.from_numpy(out)



def texts_key(fingerprint: str, texts: Texts, pairs: bool) -> str:
    """The key of the vectors of distinct `texts` (strings, or (first, second) pairs) under an encoder."""
    h = hashlib.sha256(json.dumps({"encoder": fingerprint, "pairs": pairs, "count": len(texts)}).encode())
    for text in texts:
        for part in text if pairs else (text,):
            b = part.encode()
            h.update(len(b).to_bytes(8, "little"))  # length prefixes keep ("ab", "c") apart from ("a", "bc")
            h.update(b)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous [start, stop) of n items that `rank` of `world_size` encodes."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _no_barrier() -> None:
    return None


class TextVectorCache:
    """The on-disk vectors of distinct texts, one entry per key (see the module docstring for the layout).

    Args:
        root: the folder holding the entries.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def entry(self, key: str) -> Path:
        return self.root / key[:32]

    def load(self, key: str, rows: int) -> np.ndarray | None:
        """The memory-mapped D x H vectors of `key` if its entry is whole; else a warning and None."""
        path = self.entry(key)
        if not path.exists():
            return None
        try:
            meta = json.loads((path / "meta.json").read_text())
            problem = None
            if meta.get("key") != key:
                problem = "it holds another key"
            elif meta.get("rows") != rows:
                problem = f"it has {meta.get('rows')} rows, expected {rows}"
            elif meta.get("sha256") != file_sha256(path / "vectors.npy"):
                problem = "its checksum does not match"
            else:
                vectors = np.load(path / "vectors.npy", mmap_mode="r")
                if vectors.shape[0] != rows or vectors.dtype != np.float32:
                    problem = f"it holds a {vectors.dtype} array of shape {vectors.shape}"
        except (OSError, ValueError, KeyError) as err:
            problem = f"it cannot be read: {err}"
        if problem is None:
            return vectors
        warnings.warn(f"text embedding cache {path} is damaged ({problem}); rebuilding it", stacklevel=3)
        return None

    @contextmanager
    def _writing(self, key: str, rows: int, dim: int, precision: str) -> Iterator[np.ndarray]:
        """A rows x dim memory-mapped array to fill; on exit the entry gets its checksum and is renamed in."""
        with atomic_path(self.entry(key), directory=True) as tmp:
            out = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(rows, dim))
            yield out
            out.flush()
            del out
            meta = {"key": key, "rows": rows, "dim": dim, "precision": precision,
                    "sha256": file_sha256(tmp / "vectors.npy")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    def vectors(self, encoder: FrozenEncoder, first: Sequence[str], second: Sequence[str] | None, *,
                rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = _no_barrier,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of N texts (or (first, second) pairs) as (D x H vectors of the D distinct texts,
        memory-mapped; N indices into them): `vectors[index]` are the N rows' vectors. Each distinct text is
        encoded once, sharded over the ranks when called by all of them; a cached entry is read, not encoded."""
        unique, index = distinct(first, second)
        return self.build(encoder, unique, second is not None, rank=rank, world_size=world_size, barrier=barrier,
                          progress=progress), index

    def build(self, encoder: FrozenEncoder, texts: Texts, pairs: bool, *, rank: int = 0, world_size: int = 1,
              barrier: Callable[[], None] = _no_barrier, progress: bool = True) -> np.ndarray:
        """The D x H vectors of D distinct, sorted `texts`, encoded now unless cached. Every rank calls this
        with the same texts; each encodes its shard, rank 0 joins them, and all return the memory-mapped entry.
        The root must be a folder that every rank sees (one machine, or a shared file system)."""
        key = texts_key(encoder.fingerprint, texts, pairs)
        vectors = self.load(key, len(texts))
        barrier()  # nobody may start rebuilding an entry that another rank is still checking
        if vectors is not None:
            return vectors
        n, dim = len(texts), encoder.output_dim

        def encode(out: np.ndarray, part: Texts) -> None:
            encoder.encode_into(out, [t[0] for t in part] if pairs else part, [t[1] for t in part] if pairs else None,
                                progress=progress and rank == 0)

        if world_size == 1:
            with self._writing(key, n, dim, encoder.precision) as out:
                encode(out, texts)
            return np.load(self.entry(key) / "vectors.npy", mmap_mode="r")  # just written: no second checksum pass
        shards = self.root / f".{key[:32]}.shards-{world_size}"
        start, stop = shard_bounds(n, rank, world_size)
        with atomic_path(shards / f"rank{rank}", directory=True) as tmp:
            out = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(stop - start, dim))
            encode(out, texts[start:stop])
            out.flush()
            del out
        barrier()
        if rank == 0:
            missing = [r for r in range(world_size) if not (shards / f"rank{r}" / "vectors.npy").is_file()]
            if missing:
                raise RuntimeError(f"text cache: shards of rank(s) {missing} are missing from {shards}; the text"
                                   " cache folder must be one that every rank sees (a shared file system)")
            with self._writing(key, n, dim, encoder.precision) as out:
                for r in range(world_size):
                    a, b = shard_bounds(n, r, world_size)
                    out[a:b] = np.load(shards / f"rank{r}" / "vectors.npy", mmap_mode="r")
            shutil.rmtree(shards, ignore_errors=True)
        barrier()
        vectors = self.load(key, len(texts))
        if vectors is None:
            raise RuntimeError(f"text cache entry {self.entry(key)} was not written; is {self.root} seen by all ranks?")
        return vectors


def distinct(first: Sequence[str], second: Sequence[str] | None) -> tuple[list, np.ndarray]:
    """The sorted distinct texts (or pairs) and, per input row, the index of its text among them."""
    texts = list(zip(first, second, strict=True)) if second is not None else list(first)
    unique = sorted(set(texts))  # sorted: the same texts in another order share one entry
    position = {text: i for i, text in enumerate(unique)}
    return unique, np.fromiter((position[t] for t in texts), dtype=np.int64, count=len(texts))
