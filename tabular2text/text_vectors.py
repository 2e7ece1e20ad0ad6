"""The text side of the data: each row's text vectors from an on-disk cache, served as `batch["text"]`.

A frozen language tower's output for a row never changes, and encoding is the only expensive part of stage 1,
so each distinct text is encoded once and kept on disk. The data module owns this: it is handed a
`TextEncoder` (the language tower's `towers.encoder.FrozenEncoder` satisfies it; this package imports
nothing of the towers), builds or reads the cache, and puts each batch's vectors next to its features
(`FrozenText`); for a trainable tower it puts the batch's token ids there instead (`TokenizedText`), and for
trainable top blocks over cached lower blocks the batch's cached hidden states (`TokenStates`).

Layout of one cache entry, a directory named by its key (the encoder's fingerprint and the texts):

    text-vectors/<key[:32]>/vectors.npy   D x W, one row per distinct text, in sorted text order: float32
                                          pooled vectors (W = H), or float16 hidden states (W = max_length x H)
    text-vectors/<key[:32]>/meta.json     key, rows, dim, dtype, precision, sha256 of vectors.npy

Under data parallelism every rank encodes one contiguous shard of the distinct texts and rank 0 joins the
shards into the one entry every rank then reads, memory-mapped. Entries are written to a temporary
directory and renamed; a damaged entry (checksum, size or key) is reported and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from tabular2text.atomic import atomic_path, file_sha256, open_reserved_memmap
from tabular2text.schema import OOV, PAD

Texts = Sequence[str] | Sequence[tuple[str, str]]
Batch = dict[str, torch.Tensor]
Tokenize = Callable[[list[str], list[str]], Mapping[str, torch.Tensor]]


class TextEncoder(Protocol):
    """What the cache needs of a language tower: a fingerprint of everything its vectors depend on, their
    width and dtype, a precision label, and a way to write the vectors of N texts (or pairs) into an N x W
    array. Serving hidden states (`TokenStates`) also needs H and each text's number of tokens."""

    fingerprint: str
    output_dim: int
    dtype: np.dtype
    precision: str
    hidden_size: int

    def token_lengths(self, first: Sequence[str], second: Sequence[str] | None = None) -> np.ndarray: ...

    def encode_into(self, out: np.ndarray, first: Sequence[str], second: Sequence[str] | None = None,
                    progress: bool = True) -> None: ...


def texts_key(fingerprint: str, texts: Texts, pairs: bool) -> str:
    """The key of the vectors of distinct `texts` (strings, or (first, second) pairs) under an encoder."""
    h = hashlib.sha256(json.dumps({"encoder": fingerprint, "pairs": pairs, "count": len(texts)}).encode())
    for text in texts:
        for part in text if pairs else (text,):
            b = part.encode()
            h.update(len(b).to_bytes(8, "little"))  # length prefixes keep ("ab", "c") apart from ("a", "bc")
            h.update(b)
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

    def load(self, key: str, rows: int, dtype: np.dtype | type = np.float32) -> np.ndarray | None:
        """The memory-mapped D x W vectors of `key` if its entry is whole; else a warning and None."""
        path = self.entry(key)
        if not path.exists():
            return None
        problem = entry_problem(path, key, rows, dtype)
        if problem is None:
            return np.load(path / "vectors.npy", mmap_mode="r")
        warnings.warn(f"text embedding cache {path} is damaged ({problem}); rebuilding it", stacklevel=3)
        return None

    @contextmanager
    def _writing(self, key: str, rows: int, dim: int, dtype: np.dtype, precision: str) -> Iterator[np.ndarray]:
        """A rows x dim memory-mapped array to fill; on exit the entry gets its checksum and is renamed in, unless
        another process (a run sharing the cache) finished a whole entry of the key first: that one stays."""
        with atomic_path(self.entry(key), directory=True,
                         replace=lambda found: entry_problem(found, key, rows, dtype) is not None) as tmp:
            out = open_reserved_memmap(tmp / "vectors.npy", dtype, (rows, dim))
            yield out
            out.flush()
            del out
            meta = {"key": key, "rows": rows, "dim": dim, "dtype": str(dtype), "precision": precision,
                    "sha256": file_sha256(tmp / "vectors.npy")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    def vectors(self, encoder: TextEncoder, first: Sequence[str], second: Sequence[str] | None, *,
                rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = _no_barrier,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of N texts (or (first, second) pairs) as (D x H vectors of the D distinct texts,
        memory-mapped; N indices into them): `vectors[index]` are the N rows' vectors. Each distinct text is
        encoded once, sharded over the ranks when called by all of them; a cached entry is read, not encoded."""
        unique, index = distinct(first, second)
        return self.build(encoder, unique, second is not None, rank=rank, world_size=world_size, barrier=barrier,
                          progress=progress), index

    def build(self, encoder: TextEncoder, texts: Texts, pairs: bool, *, rank: int = 0, world_size: int = 1,
              barrier: Callable[[], None] = _no_barrier, progress: bool = True) -> np.ndarray:
        """The D x H vectors of D distinct, sorted `texts`, encoded now unless cached. Every rank calls this
        with the same texts; each encodes its shard, rank 0 joins them, and all return the memory-mapped entry.
        The root must be a folder that every rank sees (one machine, or a shared file system)."""
        key = texts_key(encoder.fingerprint, texts, pairs)
        vectors = self.load(key, len(texts), encoder.dtype)
        barrier()  # nobody may start rebuilding an entry that another rank is still checking
        if vectors is not None:
            return vectors
        n, dim, dtype = len(texts), encoder.output_dim, encoder.dtype

        def encode(out: np.ndarray, part: Texts) -> None:
            encoder.encode_into(out, [t[0] for t in part] if pairs else part, [t[1] for t in part] if pairs else None,
                                progress=progress and rank == 0)

        if world_size == 1:
            with self._writing(key, n, dim, dtype, encoder.precision) as out:
                encode(out, texts)
            return np.load(self.entry(key) / "vectors.npy", mmap_mode="r")  # just written: no second checksum pass
        shards = self.root / f".{key[:32]}.shards-{world_size}"
        start, stop = shard_bounds(n, rank, world_size)
        with atomic_path(shards / f"rank{rank}", directory=True) as tmp:
            out = open_reserved_memmap(tmp / "vectors.npy", dtype, (stop - start, dim))
            encode(out, texts[start:stop])
            out.flush()
            del out
        barrier()
        if rank == 0:
            missing = [r for r in range(world_size) if not (shards / f"rank{r}" / "vectors.npy").is_file()]
            if missing:
                raise RuntimeError(f"text cache: shards of rank(s) {missing} are missing from {shards}; the text"
                                   " cache folder must be one that every rank sees (a shared file system)")
            with self._writing(key, n, dim, dtype, encoder.precision) as out:
                for r in range(world_size):
                    a, b = shard_bounds(n, r, world_size)
                    out[a:b] = np.load(shards / f"rank{r}" / "vectors.npy", mmap_mode="r")
            shutil.rmtree(shards, ignore_errors=True)
        barrier()
        vectors = self.load(key, len(texts), dtype)
        if vectors is None:
            raise RuntimeError(f"text cache entry {self.entry(key)} was not written; is {self.root} seen by all ranks?")
        return vectors


def entry_problem(path: Path, key: str, rows: int, dtype: np.dtype | type) -> str | None:
    """What is wrong with the cache entry at `path` for `rows` vectors of `key`, or None when it is whole."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("key") != key:
            return "it holds another key"
        if meta.get("rows") != rows:
            return f"it has {meta.get('rows')} rows, expected {rows}"
        if meta.get("sha256") != file_sha256(path / "vectors.npy"):
            return "its checksum does not match"
        vectors = np.load(path / "vectors.npy", mmap_mode="r")
        if vectors.shape[0] != rows or vectors.dtype != dtype:
            return f"it holds a {vectors.dtype} array of shape {vectors.shape}"
    except (OSError, ValueError, KeyError, AttributeError) as err:
        return f"it cannot be read: {err}"
    return None


def distinct(first: Sequence[str], second: Sequence[str] | None) -> tuple[list, np.ndarray]:
    """The sorted distinct texts (or pairs) and, per input row, the index of its text among them."""
    texts = list(zip(first, second, strict=True)) if second is not None else list(first)
    unique = sorted(set(texts))  # sorted: the same texts in another order share one entry
    position = {text: i for i, text in enumerate(unique)}
    return unique, np.fromiter((position[t] for t in texts), dtype=np.int64, count=len(texts))


Part = tuple[np.ndarray, np.ndarray]  # (D x H vectors of the distinct texts, memory-mapped; per row, an index)


class FrozenText:
    """`batch["text"]` of a frozen language tower: each row's cached vectors, concatenated.

    Args:
        parts: split -> the text parts of its rows, in order (row text: the (user, item) pair; entity text:
            the user profile, then the item sentence).
        item_vectors: entity text: item id -> its item sentence's vector (zeros for PAD and unseen ids); a row
            then also gets the mean of its history items' vectors.
        history_field: the behavior sequence whose items are averaged.
    """

    def __init__(self, parts: dict[str, list[Part]], item_vectors: torch.Tensor | None = None,
                 history_field: str | None = None) -> None:
        self.parts, self.item_vectors, self.history_field = parts, item_vectors, history_field

    def __call__(self, split: str, batch: Batch) -> torch.Tensor:
        rows = batch["row"].numpy()
        vectors = [torch.from_numpy(table[index[rows]]) for table, index in self.parts[split]]
        if self.item_vectors is not None and self.history_field:
            history = batch[self.history_field]  # B x L item ids, 0-padded
            # the mean over known items (zeros for none): unknown ids become padding, which the bag leaves out;
            # one fused pass, not the B x L x H gather of a plain index
            known = history * (history > OOV)
            vectors.append(F.embedding_bag(known, self.item_vectors, mode="mean", padding_idx=PAD))
        return torch.cat(vectors, dim=-1)


class TokenizedText:
    """`batch["text"]` of a trainable language tower: the token ids of the batch's (user, item) sentence pairs.

    Args:
        texts: split -> (user sentences, item sentences) per row.
        tokenize: the language tower's tokenizer call, pairs -> input_ids, attention_mask, ...
    """

    def __init__(self, texts: dict[str, tuple[list[str], list[str]]], tokenize: Tokenize) -> None:
        self.texts, self.tokenize = texts, tokenize

    def __call__(self, split: str, batch: Batch) -> dict[str, torch.Tensor]:
        users, items = self.texts[split]
        rows = batch["row"].tolist()
        return dict(self.tokenize([users[i] for i in rows], [items[i] for i in rows]))


class TokenStates:
    """`batch["text"]` of trainable top blocks over cached lower blocks: the hidden states that enter the top
    blocks, cut to the batch's longest text, and their attention mask.

    Args:
        parts: split -> (D x max_length*H float16 states of the distinct texts, memory-mapped; per row, an
            index into them; per row, its number of tokens).
        hidden_size: H.
    """

    def __init__(self, parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], hidden_size: int) -> None:
        self.parts, self.hidden_size = parts, hidden_size

    def __call__(self, split: str, batch: Batch) -> dict[str, torch.Tensor]:
        table, index, lengths = self.parts[split]
        rows = batch["row"].numpy()
        length = torch.from_numpy(lengths[rows])
        width = int(length.max()) if len(rows) else 0
        states = torch.from_numpy(table[index[rows]]).view(len(rows), -1, self.hidden_size)[:, :width]
        return {"states": states, "attention_mask": (torch.arange(width) < length[:, None]).long()}


def with_text(text: FrozenText | TokenizedText | TokenStates, split: str, batch: Batch) -> Batch:
    """The batch plus its `text` (a DataLoader collate function, with `text` and `split` bound)."""
    return {**batch, "text": text(split, batch)}
