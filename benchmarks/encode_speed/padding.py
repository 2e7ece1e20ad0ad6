"""How far the frozen encoder pads its batches, on the texts the default stage 1 encodes: a data set's entity
sentences (the item catalog, and the user-profile and item sentences of the rows before test; 2,476 distinct on
ML-100K, 25 tokens on average).

    python -m benchmarks padding --data_dir ../shared/data/ml-100k
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python -m benchmarks padding ...    # oneDNN without AMX: AVX512-BF16
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m benchmarks padding ...

Each round encodes every distinct sentence once per padding multiple (`FrozenEncoder(pad_multiple=...)`: batches
of 64 length-sorted texts padded to a multiple of that many tokens), the multiples alternating, after one
warm-up pass each. Prints texts/s per round and the median, and the lowest cosine of each multiple's vectors to
the first's. Writes nothing; encode_speed.md keeps the tables behind `towers.encoder.default_pad_multiple`.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from ctrl.app.report import cpu_model
from tabular2text.datamodule import CTRDataModule
from towers.encoder import FrozenEncoder, Precision, resolve_precision
from towers.language import LanguageTower

CPU_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")  # oneDNN's cap is in cpu_model()


def entity_sentences(data_dir: str) -> list[str]:
    """The distinct sentences the default stage 1 encodes, in its order (`CTRDataModule._entity_vectors`)."""
    data = CTRDataModule(data_dir)
    texts = [*data.item_catalog()[1], *data.before_test("user_profile_text"), *data.before_test("item_text")]
    return list(dict.fromkeys(texts))


def main(data_dir: str = "data/ml-100k", precision: Precision = "auto", multiples: tuple[int, ...] = (16, 8, 1),
         rounds: int = 2) -> None:
    """Time each padding multiple on the same sentences and print the table.

    Args:
        data_dir: a data set's directory (MovieLens, RecBole or a schema YAML).
        precision: the encoder's weights: auto (as stage 1 picks them), fp32 or bf16.
        multiples: padding multiples to compare.
        rounds: alternating passes over all of them.
    """
    texts = entity_sentences(data_dir)
    precision = resolve_precision(precision, torch.device("cpu"))
    caps = "".join(f", {k}={os.environ[k]}" for k in CPU_CAPS if k in os.environ)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}{caps};"
          f" all-MiniLM-L6-v2, {precision}, batches of 64; {len(texts)} distinct entity sentences")
    encoders = {m: FrozenEncoder(LanguageTower(), "cpu", precision, pad_multiple=m) for m in multiples}
    rates: dict[int, list[float]] = {m: [] for m in multiples}
    vectors = {}
    for enc in encoders.values():
        enc.encode(texts[:256])  # warm-up
    for r in range(rounds):
        for m, enc in encoders.items():
            start = time.perf_counter()
            vectors[m] = enc.encode(texts)
            rates[m].append(len(texts) / (time.perf_counter() - start))
            print(f"  round {r + 1}, pad to {m}: {rates[m][-1]:.1f} texts/s", flush=True)
    first = multiples[0]
    print(f"\n| pad to | texts/s (median of {rounds}) | x pad to {first} | min cosine to pad to {first} |")
    print("|---|---|---|---|")
    for m in multiples:
        cosine = torch.nn.functional.cosine_similarity(vectors[m], vectors[first], dim=1).min()
        rate = statistics.median(rates[m])
        print(f"| {m} | {rate:.1f} | {rate / statistics.median(rates[first]):.2f} | {cosine:.5f} |")
