"""The one command line of the study scripts: `python -m benchmarks STUDY [options]`.

    python -m benchmarks --help            # the studies
    python -m benchmarks cost --help       # one study's options: its function's arguments

A study script defines a plain function (its docstring's `Args:` are the help); this module is the only place
that parses arguments (jsonargparse's `auto_cli` on that function). A study's module is imported only when it
runs, so `peer_fuxictr` alone needs the optional FuxiCTR (`pip install -e '.[peer]'`).
"""

from __future__ import annotations

import importlib
import shlex
import sys

from jsonargparse import auto_cli

# study -> (module, function, what it writes)
STUDIES = {
    "backbones": ("benchmarks.backbones.backbones_ml100k", "main",
                  "every backbone trained from scratch on ML-100K -> backbones/backbones_ml100k.md"),
    "cost": ("benchmarks.cost.cost_ml100k", "main",
             "inference cost of CTRL's export, the plain backbones and a frozen-MiniLM scorer -> cost/cost_ml100k.md"),
    "encode_speed": ("benchmarks.encode_speed.encode_speed", "main",
                     "language-tower encoding speed per CPU candidate (printed; encode_speed/encode_speed.md)"),
    "padding": ("benchmarks.encode_speed.padding", "main",
                "the encoder's batch padding on the default stage 1's entity sentences (printed; encode_speed.md)"),
    "peer_fuxictr": ("benchmarks.peer_fuxictr.fuxictr_ml100k", "main",
                     "FuxiCTR's DCN and DeepFM beside ours on our split -> peer_fuxictr/fuxictr_ml100k.md"),
    "recipe_sweep": ("benchmarks.stage1_design.recipe_sweep_ml100k", "main",
                     "the stage-1 recipe (batch, temperature, length) on DCN seed 0 -> stage1_design/"),
    "quality": ("benchmarks.stage1_quality.quality_ml100k", "main",
                "stage-1 variants, the stage-1 curve and a tuning table from `ctrl bench` stores (validation only)"),
    "synthetic_ml1m": ("benchmarks.scale.synthetic_ml1m", "generate",
                       "a 1M-rating table in the MovieLens-1M format, for `scale`"),
    "granularity": ("benchmarks.granularity.decide", "main",
                    "the text-granularity rule applied to row- vs entity-text stores -> granularity/decision.md"),
    "amazon_slice": ("benchmarks.granularity.amazon_slice", "main",
                     "a seeded user slice of Amazon Beauty, for the granularity rule's row arm (printed)"),
    "negatives": ("benchmarks.negatives.negatives_shortcuts", "main",
                  "how much the item alone predicts a sampled label, per rule and window -> negatives/shortcuts.md"),
    "scale": ("benchmarks.scale.scale", "main", "wall time and peak RSS per phase on 1M ratings (scale/scale.md)"),
}


def command() -> str:
    """The command line that is running, for a report to name."""
    return shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])


def usage() -> str:
    width = max(map(len, STUDIES))
    return "\n".join(["usage: python -m benchmarks STUDY [--help | options]", "", "studies:",
                      *[f"  {name:<{width}}  {what}" for name, (_, _, what) in STUDIES.items()]])


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else args
    if not args or args[0] not in STUDIES:
        asked = bool(args) and args[0] in ("-h", "--help")
        print(usage() if asked or not args else f"error: unknown study {args[0]!r}\n\n{usage()}",
              file=sys.stdout if asked else sys.stderr)
        raise SystemExit(0 if asked else 2)
    module, function, _ = STUDIES[args[0]]
    try:
        study = importlib.import_module(module)
    except ModuleNotFoundError as missing:  # an optional package (FuxiCTR: pip install -e '.[peer]')
        needs = f"the study {args[0]!r} needs the package {missing.name!r}; install it (pip install -e '.[peer]')"
        if any(a in ("-h", "--help") for a in args[1:]):  # what it does and what it needs, not a failure
            print(f"usage: python -m benchmarks {args[0]} [options]\n\n{STUDIES[args[0]][2]}\n\n{needs}")
            raise SystemExit(0) from None
        raise SystemExit(f"error: {needs}") from None
    auto_cli(getattr(study, function), args=args[1:],
             prog=f"python -m benchmarks {args[0]}")
