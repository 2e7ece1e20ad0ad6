"""Text-encoding speed of the language tower on ML-100K: a naive Hugging Face loop vs the cache builder.

    python benchmarks/encode_speed.py --data-dir /work/shared/data/ml-100k --n 5000
    python benchmarks/encode_speed.py --data-dir /work/shared/data/ml-100k --n 5000 --full --cache-dir /tmp/text-cache

On the same N texts (a seeded sample of all splits, as (user sentence, item sentence) pairs) it times
  (a) naive: padding to max_length, batch 64, fp32, `torch.no_grad`, mean pooling;
  (b) the cache builder `cached_text_embeddings` on an empty cache (length-sorted batches,
      `torch.inference_mode`, bf16 autocast, key fingerprinting and the file write included),
and prints both rates, the speed-up and the cosine between the bf16 (b) and fp32 (a) vectors.
`--full` also builds the cache of every ML-100K text in `--cache-dir` and times a reload by a fresh tower.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ctrl.data.datamodule import CTRDataModule
from towers.language import LanguageTower
from towers.text_cache import cached_text_embeddings


def all_pairs(data_dir: str) -> tuple[list[str], list[str]]:
    """(user sentences, item sentences) of every row of every split, as the data pipeline renders them."""
    data = CTRDataModule(data_dir)
    first: list[str] = []
    second: list[str] = []
    for split in ("train", "val", "test"):
        a, b = data.texts(split)
        first += a
        second += b
    return first, second


def naive_encode(tower: LanguageTower, first: list[str], second: list[str], batch_size: int) -> torch.Tensor:
    """The usual first attempt: every batch padded to max_length, fp32, gradients merely disabled."""
    tokenizer, model = tower.tokenizer, tower.model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(first), batch_size):
            enc = tokenizer(first[i:i + batch_size], second[i:i + batch_size], padding="max_length",
                            truncation="only_first", max_length=tower.max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--n", type=int, default=5000, help="texts in the naive-vs-cache comparison")
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128, help="cache builder batch (naive uses 64)")
    parser.add_argument("--full", action="store_true", help="also build and reload the cache of all texts")
    parser.add_argument("--cache-dir", default=None, help="cache folder for --full (default: a temporary one)")
    args = parser.parse_args(argv)

    first, second = all_pairs(args.data_dir)
    pick = torch.randperm(len(first), generator=torch.Generator().manual_seed(0))[:args.n].tolist()
    sample_first, sample_second = [first[i] for i in pick], [second[i] for i in pick]
    tower = LanguageTower(args.model, max_length=args.max_length)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model} pooling=mean "
          f"max_length={args.max_length}; {len(first)} ML-100K texts, {len(pick)} sampled")

    naive_encode(tower, sample_first[:64], sample_second[:64], 64)  # warm-up: first-call allocations
    fp32, naive_s = timed(lambda: naive_encode(tower, sample_first, sample_second, 64))
    with tempfile.TemporaryDirectory() as empty:
        cached_text_embeddings(tower, sample_first[:64], sample_second[:64], empty, bf16=True, progress=False)
    with tempfile.TemporaryDirectory() as empty:
        bf16, cache_s = timed(lambda: cached_text_embeddings(tower, sample_first, sample_second, empty,
                                                             args.batch_size, bf16=True, progress=False))
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=1)
    naive_rate, cache_rate = len(pick) / naive_s, len(pick) / cache_s
    print(f"(a) naive  (pad to {args.max_length}, batch 64, fp32):        {naive_rate:7.1f} texts/s ({naive_s:.1f} s)")
    print(f"(b) cache builder (sorted, batch {args.batch_size}, bf16 autocast): {cache_rate:7.1f} texts/s "
          f"({cache_s:.1f} s)")
    print(f"speed-up (b)/(a): {cache_rate / naive_rate:.2f}x")
    print(f"cosine(bf16, fp32): mean {cosine.mean():.5f}, min {cosine.min():.5f}")

    if args.full:
        cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="text-cache-")
        vectors, build_s = timed(lambda: cached_text_embeddings(tower, first, second, cache_dir,
                                                                args.batch_size, bf16=True))
        fresh, load_s = timed(lambda: LanguageTower(args.model, max_length=args.max_length))
        again, reload_s = timed(lambda: cached_text_embeddings(fresh, first, second, cache_dir,
                                                               args.batch_size, bf16=True))
        assert torch.equal(again, vectors)
        print(f"full cache of {len(first)} texts in {cache_dir}: built in {build_s:.1f} s "
              f"({len(first) / build_s:.1f} texts/s); reload by a fresh tower {reload_s:.2f} s "
              f"(+ {load_s:.2f} s to load the tower)")


if __name__ == "__main__":
    main()
