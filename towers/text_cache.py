"""Pooled vectors of a frozen language tower, computed once per distinct text and kept on disk.

With a frozen language tower, stage 1 needs its output for every row only once; encoding is the only
expensive part, so `cached_text_embeddings` encodes each distinct (user sentence, item sentence) pair once
and stores the vectors under a key that fingerprints everything they depend on: the model's config and
weights, the tokenizer, pooling, max_length, bf16 and the texts. A changed template or model therefore
never meets stale vectors. Files are written atomically and carry a checksum; a damaged file is reported
and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from towers.language import LanguageTower

CACHE_VERSION = 1  # bump when tokenization, pooling or the file layout change what a key stands for


def encode_texts(tower: LanguageTower, first: Sequence[str], second: Sequence[str] | None = None,
                 batch_size: int = 128, bf16: bool = False, progress: bool = True) -> torch.Tensor:
    """Encode texts in eval mode without gradients, batching texts of similar token length together.

    Args:
        tower: the language tower.
        first: N user sentences (or whole texts when `second` is None).
        second: N item sentences, or None.
        batch_size: texts per forward pass.
        bf16: run the forward pass under bfloat16 autocast (about 1.45x per batch on a CPU with AMX).
        progress: show a progress bar.

    Returns:
        N x H float32 vectors, in the order of the input.
    """
    # N x L tensors padded to the longest; a plain dict frees the tokenizer's per-text objects at once.
    enc = dict(tower.tokenize(list(first), None if second is None else list(second)))
    n = enc["input_ids"].shape[0]
    # Longest first: similar lengths share a batch, so little compute goes to padding.
    order = torch.argsort(enc["attention_mask"].sum(1), descending=True, stable=True)
    device = next(tower.parameters()).device
    vectors = torch.empty(n, tower.output_dim)
    was_training = tower.training
    tower.eval()
    try:
        with torch.inference_mode(), tqdm(total=n, unit="text", desc="encoding texts", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                rows = order[start:start + batch_size]
                batch = {k: v[rows] for k, v in enc.items()}
                real = batch["attention_mask"].any(0)  # drop columns that are padding in every row of the batch
                batch = {k: v[:, real].to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    vectors[rows] = tower(**batch).float().cpu()
                bar.update(len(rows))
    finally:
        tower.train(was_training)
    return vectors


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


def model_fingerprint(tower: LanguageTower) -> str:
    """sha256 of the model class, its config (without its path) and every weight and buffer."""
    config = tower.model.config.to_dict()
    config.pop("_name_or_path", None)  # the same model moved to another folder is the same model
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


def cache_key(tower: LanguageTower, texts: Sequence[str] | Sequence[tuple[str, str]], pairs: bool,
              bf16: bool) -> str:
    """The key of the vectors of `texts` (strings, or (first, second) pairs when `pairs`) under `tower`."""
    settings = {"version": CACHE_VERSION, "pooling": tower.pooling, "max_length": tower.max_length,
                "bf16": bf16, "pairs": pairs, "count": len(texts)}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(model_fingerprint(tower).encode())
    h.update(tokenizer_fingerprint(tower).encode())
    for text in texts:
        for part in text if pairs else (text,):
            b = part.encode()
            h.update(len(b).to_bytes(8, "little"))  # length prefixes keep ("ab", "c") apart from ("a", "bc")
            h.update(b)
    return h.hexdigest()


def load_vectors(path: Path, key: str, rows: int) -> torch.Tensor | None:
    """The vectors stored at `path` if the file is whole and holds `key`; else a warning and None."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            vectors = f.get_tensor("vectors")
        problem = None
        if meta.get("key") != key:
            problem = "it holds another key"
        elif vectors.shape[0] != rows or meta.get("rows") != str(rows):
            problem = f"it has {vectors.shape[0]} rows, expected {rows}"
        elif meta.get("sha256") != _tensor_digest(vectors):
            problem = "its checksum does not match"
    except (SafetensorError, OSError, KeyError) as err:
        problem = f"it cannot be read: {err}"
    if problem is None:
        return vectors
    warnings.warn(f"text embedding cache {path} is damaged ({problem}); rebuilding it", stacklevel=3)
    return None


def save_vectors(path: Path, key: str, vectors: torch.Tensor) -> None:
    """Write `vectors` with their key and checksum to a temporary file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        vectors = vectors.contiguous()
        save_file({"vectors": vectors}, tmp,
                  metadata={"key": key, "rows": str(vectors.shape[0]), "sha256": _tensor_digest(vectors)})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is shared like any other cache file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_text_embeddings(tower: LanguageTower, first: Sequence[str], second: Sequence[str] | None,
                           cache_dir: str | Path, batch_size: int = 128, bf16: bool = False,
                           progress: bool = True) -> torch.Tensor:
    """Vectors of a frozen tower for every text, each distinct text encoded once and cached on disk.

    Args:
        tower: a frozen language tower (trainable_layers=0).
        first: N user sentences (or whole texts when `second` is None).
        second: N item sentences, or None.
        cache_dir: folder of the cache files (one file per key).
        batch_size: texts per forward pass when encoding.
        bf16: encode under bfloat16 autocast; part of the key.
        progress: show a progress bar while encoding.

    Returns:
        N x H float32 vectors, in the order of the input.
    """
    if tower.trainable:
        raise ValueError("only a frozen language tower's vectors can be cached; use trainable_layers=0")
    pairs = second is not None
    texts = list(zip(first, second, strict=True)) if pairs else list(first)
    unique = sorted(set(texts))  # sorted: the same texts in another order share one file
    position = {text: i for i, text in enumerate(unique)}
    inverse = torch.tensor([position[text] for text in texts], dtype=torch.long)

    key = cache_key(tower, unique, pairs, bf16)
    path = Path(cache_dir).expanduser() / f"text-vectors-{key[:32]}.safetensors"
    vectors = load_vectors(path, key, len(unique)) if path.exists() else None
    if vectors is None:
        unique_first = [t[0] for t in unique] if pairs else unique
        unique_second = [t[1] for t in unique] if pairs else None
        vectors = encode_texts(tower, unique_first, unique_second, batch_size, bf16, progress)
        save_vectors(path, key, vectors)
    return vectors[inverse]
