"""The `ctrl` command.

    ctrl prepare --data_dir DIR          prepare a data set; print split sizes, positive rates and texts
    ctrl fit|validate|test|predict ...   Lightning CLI; the model's class_path picks the stage

Data errors print one clear line and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import sys

from jsonargparse import CLI
from pytorch_lightning.cli import LightningCLI

from ctrl.data.datamodule import CTRDataModule
from ctrl.data.sources import DataError


def prepare(*, data_dir: str, download: bool = False, history_length: int = 10, template: str = "natural",
            cache_dir: str | None = None, show: int = 3) -> None:
    """Prepare a data set once (cached by fingerprint) and summarise it.

    Args:
        data_dir: MovieLens-100K / -1M or RecBole directory, or a schema YAML for generic data.
        download: fetch MovieLens-100K into data_dir when it is absent.
        history_length: number of most recent items in the behavior sequence.
        template: text template preset: natural, dash, colon, masked or values.
        cache_dir: where prepared data lives (default $CTRL_CACHE_DIR or ~/.cache/ctrl-rec).
        show: how many rendered texts of the train split to print.
    """
    dm = CTRDataModule(data_dir, download=download, history_length=history_length, template=template,
                       cache_dir=cache_dir)
    print(f"prepared: {dm.prepared_dir}")
    print(f"{'split':<6} {'rows':>8} {'positive rate':>14}")
    for split in ("train", "val", "test"):
        labels = dm.frame(split)["label"]
        print(f"{split:<6} {len(labels):>8} {labels.mean():>14.4f}")
    for text in dm.frame("train")["text"].head(show):
        print(f"\n{text}")


class CTRLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The model gets vocabularies and field kinds from the prepared data, never from repeated YAML.
        parser.link_arguments("data.feature_spec", "model.init_args.feature_spec", apply_on="instantiate")


DATA_COMMANDS = {"prepare": prepare}


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else args
    try:
        if args and args[0] in DATA_COMMANDS:
            CLI(DATA_COMMANDS, args=args)
        else:
            CTRLCLI(datamodule_class=CTRDataModule, subclass_mode_model=True, args=args,
                    save_config_kwargs={"overwrite": True})
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
