"""Text-encoding speed of the language tower on ML-100K: a naive Hugging Face loop vs every CPU candidate.

    python -m benchmarks encode_speed --data_dir ../shared/data/ml-100k --n 5000

On the same N texts (a seeded sample of all splits, as (user sentence, item sentence) pairs), one after the
other in one process, it times
  naive         padding to max_length, batch 64, fp32, `torch.no_grad`, mean pooling (the usual first loop);
  sorted_fp32   round 1's cache builder: length-sorted batches of 128, padding trimmed, fp32;
  autocast_bf16 the same under bf16 autocast (round 1's `text_bf16: true`);
  bf16_weights  `FrozenEncoder(precision="bf16")`: bf16 weights, batches of 64 padded to a multiple of 16,
                tokenized in chunks on a thread (what `text_precision: auto` picks on this CPU);
  compile_bf16  the same model under `torch.compile` (its compile time reported apart);
  onnxruntime   the fp32 model exported with `torch.onnx.export` (dynamic batch and length), ONNX Runtime CPU;
  openvino_bf16 the model converted with `openvino.convert_model`, run with INFERENCE_PRECISION_HINT bf16;
  int8_dynamic  `torch.ao.quantization.quantize_dynamic` of every Linear to int8 (fp32 activations);
and prints texts/s, the ratio to naive and the min / mean cosine of each candidate's vectors to naive's
fp32 vectors. Candidates whose package is missing (onnxruntime, openvino) are skipped with a note.
Writes nothing; the table in encode_speed.md is this script's output.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ctrl.app.report import cpu_model
from tabular2text.datamodule import CTRDataModule
from towers.encoder import FrozenEncoder
from towers.language import LanguageTower

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def sample_pairs(data_dir: str, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded sample of n (user sentence, item sentence) pairs of all splits, as the pipeline renders them."""
    data = CTRDataModule(data_dir)
    first, second = [], []
    for split in ("train", "val", "test"):
        a, b = data.texts(split)
        first += a
        second += b
    pick = random.Random(seed).sample(range(len(first)), n)
    return [first[i] for i in pick], [second[i] for i in pick]


def naive(tower: LanguageTower, first: list[str], second: list[str]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(first), 64):
            enc = tower.tokenizer(first[i:i + 64], second[i:i + 64], padding="max_length", truncation="only_first",
                                  max_length=tower.max_length, return_tensors="pt")
            out.append(tower(**enc))
    return torch.cat(out)


def sorted_batches(tower: LanguageTower, forward: Forward, first: list[str], second: list[str], batch_size: int,
                   pad_multiple: int = 1) -> torch.Tensor:
    """Length-sorted batches with padding trimmed to the batch's longest text (rounded up to pad_multiple)."""
    enc = dict(tower.tokenize(first, second))
    lengths = enc["attention_mask"].sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.empty(len(first), tower.output_dim)
    with torch.inference_mode():
        for start in range(0, len(first), batch_size):
            rows = order[start:start + batch_size]
            width = -(-int(lengths[rows].max()) // pad_multiple) * pad_multiple
            out[rows] = torch.as_tensor(forward({k: v[rows, :width] for k, v in enc.items()})).float()
    return out


class Pooled(torch.nn.Module):
    """The tower's forward with positional inputs, for exporters."""

    def __init__(self, tower: LanguageTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.tower(input_ids, attention_mask, token_type_ids)


def onnx_forward(tower: LanguageTower, example: dict, folder: Path) -> Forward:
    import onnxruntime as ort

    path = folder / "tower.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "length"} for n in names}
    torch.onnx.export(Pooled(tower), tuple(example[n] for n in names), path, input_names=names,
                      output_names=["pooled"], dynamic_axes=axes, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda b: session.run(None, {k: v.numpy() for k, v in b.items()})[0]


def openvino_forward(tower: LanguageTower, example: dict) -> Forward:
    import openvino as ov

    model = ov.convert_model(Pooled(tower), example_input=example)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16",
                                                      "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    return lambda b: request.infer({k: v.numpy() for k, v in b.items()})[compiled.output(0)].copy()


def main(data_dir: str = "data/ml-100k", n: int = 5000, seed: int = 0,
         candidates: str = "naive,sorted_fp32,autocast_bf16,bf16_weights,compile_bf16,onnxruntime,openvino_bf16,"
                           "int8_dynamic") -> None:
    """Time every candidate on the same n texts and print the table.

    Args:
        data_dir: a MovieLens-100K directory.
        n: texts in the sample.
        seed: sample seed.
        candidates: comma-separated candidates to run (naive always runs: it is the reference).
    """
    first, second = sample_pairs(data_dir, n, seed)
    wanted = set(candidates.split(",")) | {"naive"}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()};"
          f" all-MiniLM-L6-v2, mean pooling, max_length 128; {n} ML-100K texts (seed {seed})")
    tower = LanguageTower().eval()
    example = dict(tower.tokenize(first[:4], second[:4]))
    rows: list[tuple[str, float, torch.Tensor, str]] = []

    def run(name: str, fn: Callable[[], torch.Tensor], note: str = "") -> None:
        if name not in wanted:
            return
        start = time.perf_counter()
        vectors = fn()
        seconds = time.perf_counter() - start
        rows.append((name, n / seconds, vectors, note))
        print(f"  {name}: {n / seconds:.1f} texts/s", flush=True)

    run("naive", lambda: naive(tower, first, second))
    run("sorted_fp32", lambda: sorted_batches(tower, lambda b: tower(**b), first, second, 128))

    def autocast(b: dict) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return tower(**b)

    run("autocast_bf16", lambda: sorted_batches(tower, autocast, first, second, 128))
    bf16 = FrozenEncoder(LanguageTower(), "cpu", "bf16")
    run("bf16_weights", lambda: bf16.encode(first, second))
    if "compile_bf16" in wanted:
        compiled = torch.compile(bf16.tower)
        start = time.perf_counter()
        sorted_batches(bf16.tower, lambda b: compiled(**b), first[:2000], second[:2000], 64, 16)  # every shape
        warm = time.perf_counter() - start
        run("compile_bf16", lambda: sorted_batches(bf16.tower, lambda b: compiled(**b), first, second, 64, 16),
            f"after {warm:.0f} s of compiling and warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("onnxruntime", lambda: onnx_forward(tower, example, Path(tmp))),
                           ("openvino_bf16", lambda: openvino_forward(tower, example))):
            if name not in wanted:
                continue
            try:
                forward = make()
            except ImportError as err:
                print(f"  {name}: skipped ({err})")
                continue
            sorted_batches(tower, forward, first[:256], second[:256], 64, 16)  # warm-up
            run(name, lambda forward=forward: sorted_batches(tower, forward, first, second, 64, 16))
    if "int8_dynamic" in wanted:
        int8 = LanguageTower().eval()
        int8.model = torch.ao.quantization.quantize_dynamic(int8.model, {torch.nn.Linear}, dtype=torch.qint8)
        run("int8_dynamic", lambda: sorted_batches(int8, lambda b: int8(**b), first, second, 64, 16))

    reference, naive_rate = rows[0][2], rows[0][1]
    print("\n| candidate | texts/s | x naive | min cosine to fp32 | mean cosine to fp32 | note |")
    print("|---|---|---|---|---|---|")
    for name, rate, vectors, note in rows:
        cosine = torch.nn.functional.cosine_similarity(vectors, reference, dim=1).numpy().astype(np.float64)
        print(f"| {name} | {rate:.1f} | {rate / naive_rate:.2f} | {cosine.min():.5f} | {cosine.mean():.6f} | {note} |")

