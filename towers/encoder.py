"""A frozen language tower prepared for bulk encoding: loaded once, fingerprinted once, on one device (the
trainer's accelerator, or the CPU) in one precision.

`FrozenEncoder` satisfies the data side's `tabular2text.text_vectors.TextEncoder`: the data module hands it
the distinct texts to encode into its on-disk cache. Encoding streams: texts are tokenized chunk by chunk
(the next chunk on a thread while the model runs on this one) and each chunk's vectors go straight into the
array it is given, e.g. a memory-mapped file, so memory does not grow with the number of texts. The
fingerprint covers everything the vectors depend on: the model's config and weights, the tokenizer,
pooling, max_length and precision.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from towers.language import LanguageTower

# Bump when tokenization, pooling or the file layout change what a key stands for. 3: pairs are cut longest
# side first, no longer only the user sentence (vectors of pairs whose item sentence took over half of max_length
# changed).
CACHE_VERSION = 3
Precision = Literal["auto", "fp32", "bf16"]


BF16_CPU_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}  # a CPU flag that means native bf16 -> its name


def cpuinfo(field: str) -> str | None:
    """A field of the first CPU in /proc/cpuinfo, e.g. "model name" or "flags"; None where it cannot be read
    (not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field), None)


def cpu_flags() -> set[str]:
    """The CPU's feature flags; none where they cannot be read."""
    return set((cpuinfo("flags") or "").split())


def onednn_cap() -> str | None:
    """The highest instruction set oneDNN may use where the environment caps it (ONEDNN_MAX_CPU_ISA, e.g.
    AVX512_CORE_BF16 runs a CPU with AMX as one without), else None."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return None if cap is None or cap.upper() in ("ALL", "DEFAULT") else cap.upper()


# oneDNN's instruction sets without bf16 dot products: capped at one of them, it multiplies bf16 by emulation
BELOW_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def amx_bf16() -> bool:
    """Whether bf16 matrix products run on AMX tiles: the CPU has them and oneDNN is not capped below them."""
    cap = onednn_cap()
    return "amx_bf16" in cpu_flags() and (cap is None or "AMX" in cap)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively (CUDA with bf16; a CPU with AMX or AVX512-BF16 that
    oneDNN is not capped below, e.g. ONEDNN_MAX_CPU_ISA=AVX2 to measure an AVX2-only CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # elsewhere (or flags unknown) be conservative: fp32 is never wrong
    return device.type == "cpu" and bool(cpu_flags() & BF16_CPU_FLAGS.keys()) and onednn_cap() not in BELOW_BF16


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """"auto": bf16 weights where the device has native bf16 (cosine >= 0.9999 to fp32, about 3x faster on
    an AMX CPU; benchmarks/encode_speed/encode_speed.md), fp32 elsewhere, where emulated bf16 would be slower."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown text precision {precision!r}; use auto, fp32 or bf16")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def default_pad_multiple(device: torch.device, precision: Literal["fp32", "bf16"]) -> int:
    """Tokens a batch is padded to a multiple of: 16 where bf16 runs on AMX tiles (or on a GPU), which favour
    16-row blocks and prepare a kernel per shape; 1 elsewhere, where padding is only work. On ML-100K's entity
    texts (25 tokens on average) batches trimmed to their longest text encoded 1.24x as fast as batches padded
    to 16 without AMX (bf16 or fp32), 1.30x with AVX2 only and 0.98x with AMX
    (benchmarks/encode_speed/encode_speed.md)."""
    if device.type == "cpu" and not (precision == "bf16" and amx_bf16()):
        return 1
    return 16


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


def cut_warning(cut: int, n: int, pairs: bool, max_length: int) -> str:
    """The one line an encoding pass warns with when it cut texts: how many, and the option that raises the limit."""
    what = ("(user, item) texts had their item sentence cut (the longer sentence of a pair is cut first) to fit"
            if pairs else "texts were cut to fit")
    return f"{cut} of {n} {what} max_length={max_length} tokens; raise --model.init_args.max_length to keep them whole"


class FrozenEncoder:
    """A frozen language tower prepared for bulk encoding on one device in one precision.

    Args:
        tower: a frozen language tower (trainable_layers=0); it is fingerprinted in fp32, then moved.
        device: where the forward passes run, e.g. the trainer's root device.
        precision: "auto" (bf16 weights where the device has native bf16, else fp32), "fp32" or "bf16".
        batch_size: texts per forward pass (64 measured fastest on a 2-core AMX CPU).
        chunk_size: texts tokenized at once; bounds the memory of the token ids.
        pad_multiple: each batch is padded to a multiple of this many tokens; None: 16 for bf16 on AMX or a
            GPU (fewer distinct shapes for the kernels to prepare), else 1 (`default_pad_multiple`).
        lower_blocks: None (the default) writes pooled vectors. An int b writes each text's hidden states
            after the tower's first b blocks instead, the input of the blocks above (`towers.language.TopBlocks`):
            max_length x H float16 per text, zeros past its last token, flattened to one row. The tower's
            blocks above b are dropped.

    Attributes:
        fingerprint: sha256 of the model, tokenizer, pooling, max_length, precision and lower_blocks; computed
            once.
        output_dim: the width of a written row: H, or max_length x H with lower_blocks.
        hidden_size: H.
        dtype: of a written row: float32, or float16 with lower_blocks.
    """

    def __init__(self, tower: LanguageTower, device: torch.device | str = "cpu", precision: Precision = "auto",
                 batch_size: int = 64, chunk_size: int = 4096, pad_multiple: int | None = None,
                 lower_blocks: int | None = None) -> None:
        if tower.trainable:
            raise ValueError("only a frozen language tower's vectors can be cached; use trainable_layers=0")
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.pad_multiple = default_pad_multiple(self.device, self.precision) if pad_multiple is None else pad_multiple
        settings = {"version": CACHE_VERSION, "pooling": tower.pooling, "max_length": tower.max_length,
                    "precision": self.precision}
        if lower_blocks is not None:
            settings["lower_blocks"] = lower_blocks  # absent otherwise: pooled vectors keep their keys
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        h.update(model_fingerprint(tower).encode())  # of the fp32 weights as loaded, before any cast
        h.update(tokenizer_fingerprint(tower).encode())
        self.fingerprint = h.hexdigest()
        self.lower_blocks = lower_blocks
        if lower_blocks is not None:
            blocks = tower.transformer_blocks()
            if not 0 <= lower_blocks < len(blocks):
                raise ValueError(f"lower_blocks must be 0..{len(blocks) - 1}, got {lower_blocks}")
            del blocks[lower_blocks:]  # the model's last hidden state is now the input of the blocks above
        self.tower = tower.eval().to(self.device, torch.bfloat16 if self.precision == "bf16" else torch.float32)
        self.hidden_size: int = tower.output_dim
        self.output_dim: int = self.hidden_size if lower_blocks is None else tower.max_length * self.hidden_size
        self.dtype = np.dtype(np.float32 if lower_blocks is None else np.float16)

    def _tokenized_chunks(self, first: Sequence[str], second: Sequence[str] | None) -> Iterator[tuple[dict, int]]:
        """Token ids of consecutive chunks and how many of their texts were cut (`LanguageTower.tokenize_counted`);
        the next chunk is tokenized on a thread while this one encodes."""
        def tokenize(start: int) -> tuple[dict, int]:
            stop = start + self.chunk_size
            enc, cut = self.tower.tokenize_counted(list(first[start:stop]),
                                                   None if second is None else list(second[start:stop]))
            return dict(enc), cut

        starts = range(0, len(first), self.chunk_size)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(tokenize, starts[0]) if starts else None
            for i in range(len(starts)):
                enc = pending.result()
                pending = pool.submit(tokenize, starts[i + 1]) if i + 1 < len(starts) else None
                yield enc

    def encode_into(self, out: np.ndarray, first: Sequence[str], second: Sequence[str] | None = None,
                    progress: bool = True) -> None:
        """Write the N x output_dim rows of N texts (or pairs) into `out`, in input order: pooled vectors, or
        with lower_blocks the flattened hidden states.

        Args:
            out: an N x output_dim array of `dtype`, e.g. a memory-mapped file.
            first: N user sentences (or whole texts when `second` is None).
            second: N item sentences, or None.
            progress: show a progress bar.
        """
        n, cut = len(first), 0
        with torch.inference_mode(), tqdm(total=n, unit="text", desc="encoding texts", disable=not progress) as bar:
            for chunk, (enc, chunk_cut) in enumerate(self._tokenized_chunks(first, second)):
                cut += chunk_cut
                lengths = enc["attention_mask"].sum(1)
                # Longest first: similar lengths share a batch, so little compute goes to padding.
                order = torch.argsort(lengths, descending=True, stable=True)
                base = chunk * self.chunk_size
                for start in range(0, len(order), self.batch_size):
                    rows = order[start:start + self.batch_size]
                    width = -(-int(lengths[rows].max()) // self.pad_multiple) * self.pad_multiple
                    batch = {k: v[rows, :width].to(self.device) for k, v in enc.items()}
                    out[(base + rows).numpy()] = self._rows(batch)
                    bar.update(len(rows))
        if cut:
            warnings.warn(cut_warning(cut, n, second is not None, self.tower.max_length), stacklevel=2)

    def _rows(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        if self.lower_blocks is None:
            return self.tower(**batch).float().cpu().numpy()
        hidden = self.tower.model(**batch).last_hidden_state * batch["attention_mask"].unsqueeze(-1)
        if hidden.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError(f"hidden states after block {self.lower_blocks} exceed float16's range and cannot be"
                             " cached; cache the states of another block (trainable_layers) or train the whole tower")
        states = torch.zeros(len(hidden), self.tower.max_length, self.hidden_size, dtype=torch.float16)
        states[:, :hidden.shape[1]] = hidden.cpu()  # the tokenizer truncates to max_length
        return states.reshape(len(hidden), -1).numpy()

    def token_lengths(self, first: Sequence[str], second: Sequence[str] | None = None) -> np.ndarray:
        """The number of tokens (special tokens included) of each of N texts (or pairs), as encoded."""
        return np.concatenate([enc["attention_mask"].sum(1).numpy() for enc, _ in self._tokenized_chunks(first, second)]
                              or [np.zeros(0, np.int64)])

    def encode(self, first: Sequence[str], second: Sequence[str] | None = None,
               progress: bool = False) -> torch.Tensor:
        """N x H float32 vectors of N texts (or pairs), in memory."""
        out = np.empty((len(first), self.output_dim), dtype=np.float32)
        self.encode_into(out, first, second, progress)
        return torch.from_numpy(out)
