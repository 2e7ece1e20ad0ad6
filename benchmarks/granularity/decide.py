"""Apply the text-granularity rule (RULE.md, written before the runs) to `ctrl bench` stores: per data set, the
pooled mean of the paired (backbone, seed) differences of validation AUC, entity text minus row text; entity
holds on a data set at >= -0.002. Test AUC, logloss and the cold-start slice are shown and decide nothing.

    python -m benchmarks granularity '{"ML-100K": "benchmarks/granularity/ml100k.jsonl"}'
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import command
from ctrl.app.report import mean_std, read_records

THRESHOLD = -0.002
ROW, ENTITY, BASE = "ctrl", "entity_text", "base"


def paired(records: list[dict], metric: str, a: str, b: str) -> list[float]:
    """metric(a) - metric(b) for every (backbone, seed) both variants ran."""
    by = {(r["variant"], r["backbone"], r["seed"]): r["metrics"].get(metric) for r in records}
    return [by[(a, k, s)] - by[(b, k, s)] for (v, k, s) in sorted(by)
            if v == a and by.get((b, k, s)) is not None and by[(a, k, s)] is not None]


def table(name: str, records: list[dict]) -> list[str]:
    lines = [f"### {name}", "",
             "| metric | entity - row (mean of pairs) | pairs | entity better | entity | row | base |",
             "|---|---|---|---|---|---|---|"]
    for metric in ("val/auc", "test/auc", "test/logloss", "test_cold/auc"):
        diffs = paired(records, metric, ENTITY, ROW)
        if not diffs:
            continue
        values = [[r["metrics"][metric] for r in records if r["variant"] == v] for v in (ENTITY, ROW, BASE)]
        shown = [f"{mean_std(v)[0]:.4f}" if v else "-" for v in values]
        better = sum(d < 0 if metric.endswith("logloss") else d > 0 for d in diffs)
        lines.append(f"| {metric} | {sum(diffs) / len(diffs):+.4f} | {len(diffs)} | {better}/{len(diffs)} | "
                     + " | ".join(shown) + " |")
    diffs = paired(records, "val/auc", ENTITY, ROW)
    if not diffs:
        ran = sorted({f"{r['variant']} {r['backbone']} seed {r['seed']}" for r in records})
        lines += ["", f"No (entity, row) pair has finished on {name}: no decision. Finished: {', '.join(ran)}."]
    else:
        verdict = "holds" if sum(diffs) / len(diffs) >= THRESHOLD else "does not hold"
        lines += ["", f"Rule: pooled validation-AUC difference {sum(diffs) / len(diffs):+.4f} over {len(diffs)} pairs"
                      f" (threshold {THRESHOLD}): entity text **{verdict}** on {name}."]
    return [*lines, ""]


def main(stores: dict[str, str], out: str = "benchmarks/granularity/decision.md",
         reading: str = "benchmarks/granularity/reading.md") -> None:
    """Write the rule's table per data set, then the reading of it.

    Args:
        stores: data set name -> a `ctrl bench` results.jsonl holding `ctrl` (row text), `entity_text` and `base`.
        out: the markdown file to write.
        reading: what was read from the tables after the runs, appended verbatim when it exists.
    """
    lines = ["# Text granularity: the rule applied", "", f"Written by `{command()}`. The rule: `RULE.md`.", ""]
    for name, path in stores.items():
        lines += table(name, read_records(Path(path)))
    if Path(reading).is_file():
        lines.append(Path(reading).read_text())
    Path(out).write_text("\n".join(lines))
    print("\n".join(lines))
