"""Export the fine-tuned collaborative model for serving, and load it back as a scorer of raw rows.

An export directory holds:
    weights.safetensors   the CTR model's weights (no pickle)
    model.json            the backbone's class_path + init_args (rebuild the model), file checksums
    feature_spec.json     fields and vocabularies: raw values -> ids, exactly as in training
    model.pt2             the same model as a `torch.export` program (for runtimes without this package)
    model.onnx            the same model in ONNX (dynamic batch; inputs named as the encoded batch keys,
                          output `logit`), for onnxruntime and other ONNX runtimes

An export replaces its whole folder, so an existing folder is replaced only when it is empty or is an earlier
export (`may_replace`); a folder holding anything else, the checkpoint being exported or the current folder is
refused and left as it was.

Loading needs torch, pandas and this package only: no Lightning, no transformers, no language model.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save

from tabular2text.atomic import atomic_path, file_sha256, first_mismatch
from tabular2text.encode import encode_column, frame_to_tensors
from tabular2text.oserrors import PathError, option_of
from tabular2text.schema import FeatureSpec, vocab_key
from tabular2text.sources import DataError, first_bad, list_keys, out_of_range, plain
from towers.checkpoints import ExportError
from towers.collaborative import BACKBONES, CTRModel, build_backbone

EXPORT_FORMAT = "ctrl-rec/collaborative-model"
EXPORT_VERSION = 3  # 1: the backbone by its towers.BACKBONES name; 3: model.json's settings carry a checksum
FILES = ("weights.safetensors", "feature_spec.json", "model.pt2", "model.onnx")


def export_model(model: CTRModel, spec: FeatureSpec, backbone: dict | None, out_dir: str | Path,
                 checkpoint: str | Path | None = None) -> Path:
    """Write `model`, `spec` and the backbone config that rebuilds the tower (`towers.backbone_config`) to
    `out_dir`; the directory appears complete or not at all. `checkpoint`, the file the model was read from,
    must not lie in `out_dir` (`may_replace`)."""
    if not backbone:
        raise ValueError("the model's backbone config is unknown (the tower was built by a callable that is not a"
                         " backbone class or a partial of one); build it from a towers class to export it")
    out = Path(out_dir)
    # An earlier export is replaced only by a complete one; anything else is refused before any work, and asked
    # about again under the writers' lock, in case something was put there meanwhile.
    may_replace(out, checkpoint)
    with atomic_path(out, directory=True, replace=lambda found: may_replace(found, checkpoint)) as tmp:
        model = model.eval()
        # Serialized in memory and written by Python: torch's zip writer aborts the process (a C++ terminate) on a
        # full disk, while a Python write raises ENOSPC, which the CLI reports as one line naming `out_dir`.
        (tmp / "weights.safetensors").write_bytes(save({k: v.contiguous() for k, v in model.state_dict().items()}))
        spec.save(tmp / "feature_spec.json")
        example = frame_to_tensors(encode_rows(pd.DataFrame(index=range(2)), spec), spec)
        batch = torch.export.Dim("batch")
        shapes = {"batch": {k: {0: batch} for k in example}}
        program = torch.export.export(model, (example,), dynamic_shapes=shapes, strict=False)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        (tmp / "model.pt2").write_bytes(buffer.getvalue())
        export_onnx(program, list(example), tmp / "model.onnx")
        meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "backbone": backbone,
                "sha256": {f: file_sha256(tmp / f) for f in FILES}}
        meta["settings_sha256"] = settings_sha256(meta)
        (tmp / "model.json").write_text(json.dumps(meta, indent=1))
    return out


def is_export(folder: Path) -> bool:
    """Whether `folder` holds a ctrl-rec export and nothing else: a model.json of the export format beside
    only files an export writes (an older export has fewer of them)."""
    names = {p.name for p in folder.iterdir()}
    if "model.json" not in names or not names <= {"model.json", *FILES}:
        return False
    try:
        return json.loads((folder / "model.json").read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not a mapping
        return False


def may_replace(out: Path, checkpoint: str | Path | None = None) -> bool:
    """True when writing an export to `out` removes nothing but an earlier export: `out` is new, empty or an
    export, and holds neither the current folder nor `checkpoint`. Otherwise a PathError (the CLI's one line)
    names `out` and what it holds; nothing is touched."""
    if not out.is_dir():
        return True  # new, or a file that atomic_path refuses
    out = Path(os.path.abspath(out))
    real = out.resolve()
    inside = (("is or holds the current folder", Path.cwd()), ("holds the checkpoint being exported", checkpoint))
    held = [what for what, inner in inside
            if inner is not None and real in (Path(inner).resolve(), *Path(inner).resolve().parents)]
    names = sorted(p.name for p in out.iterdir())
    if not held and (not names or is_export(out)):
        return True
    problem = held[0] if held else f"holds files that are not a ctrl-rec export (e.g. {names[0]})"
    option = option_of(out)
    where = f" (from {option})" if option else ""
    raise PathError(f"{out}: {problem}{where}, and an export replaces its whole folder; pass a new or empty folder,"
                    " or an earlier export to replace")


def export_onnx(program: torch.export.ExportedProgram, inputs: list[str], path: Path) -> None:
    """Write `program` as one self-contained ONNX file: inputs named by the batch keys, output `logit`."""
    quiet = logging.getLogger("torch.onnx")  # it warns of every torchvision operator it cannot register
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        torch.onnx.export(program, f=str(path), dynamo=True, external_data=False, input_names=inputs,
                          output_names=["logit"], verbose=False)
    finally:
        quiet.setLevel(level)


def settings_sha256(meta: dict) -> str:
    """sha256 of model.json's own content (all but this checksum): the files' checksums cannot cover the file
    that holds them, and an edited hyper-parameter would otherwise build a model its weights do not fit."""
    settings = {k: v for k, v in meta.items() if k != "settings_sha256"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def load_model(export_dir: str | Path) -> tuple[CTRModel, FeatureSpec]:
    """Rebuild the CTR model from an export directory, checking every file first. Every problem of the export
    is one ExportError (or FileNotFoundError) whose message names the file and says to export again.
    Exports of version 2 and older (before model.json had a checksum) load with the checks they carry."""
    d = Path(export_dir)
    meta_path = d / "model.json"
    again = "export the model again (ctrl export --ckpt_path BEST.ckpt --out DIR)"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{d} is not a ctrl-rec export: {meta_path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{meta_path}: unreadable ({e}); {again}") from e
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{meta_path}: not a ctrl-rec collaborative-model export")
    version = meta.get("version")
    if not isinstance(version, int) or version > EXPORT_VERSION:
        raise ExportError(f"{meta_path}: export version {version!r} is not one this ctrl-rec reads (1 to"
                          f" {EXPORT_VERSION}); {again} or update ctrl-rec")
    if version >= 3 and meta.get("settings_sha256") != settings_sha256(meta):
        raise ExportError(f"{meta_path}: its content does not match its checksum (modified or damaged); {again}")
    checksums = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    unchecked = [f for f in ("weights.safetensors", "feature_spec.json") if f not in checksums]
    if unchecked:  # an edited model.json must not turn verification off
        raise ExportError(f"{meta_path}: no checksum for {', '.join(unchecked)}; the export was modified, {again}")
    bad = first_mismatch(d, checksums)
    if bad and not (d / bad).is_file():
        raise FileNotFoundError(f"{d / bad} is missing: the export is incomplete; {again}")
    if bad:
        raise ExportError(f"{d / bad} does not match its checksum in model.json (truncated or modified); {again}")
    backbone = meta.get("backbone")
    if isinstance(backbone, str):  # version 1
        if backbone not in BACKBONES:
            raise ExportError(f"{meta_path}: unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
        cls = BACKBONES[backbone]
        backbone = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": meta.get("init_args")}
    if not (isinstance(backbone, dict) and isinstance(backbone.get("class_path"), str)
            and isinstance(backbone.get("init_args", {}), dict)):
        raise ExportError(f"{meta_path}: `backbone` must be a mapping with class_path and init_args, found"
                          f" {backbone!r}; {again}")
    spec = FeatureSpec.load(d / "feature_spec.json")
    try:
        model = CTRModel(build_backbone(backbone, spec))
    except (ValueError, TypeError, AttributeError, ImportError) as e:
        raise ExportError(f"{meta_path}: {e}; {again}") from e
    try:
        model.load_state_dict(load_file(d / "weights.safetensors"))
    except (RuntimeError, OSError) as e:  # shapes of other settings, or an unreadable file
        raise ExportError(f"{d / 'weights.safetensors'} does not fit the model model.json describes"
                          f" ({str(e).splitlines()[0][:200]}); {again}") from e
    return model.eval(), spec


def encode_rows(rows: pd.DataFrame, spec: FeatureSpec, where: str = "rows") -> pd.DataFrame:
    """Raw feature rows (values as in the source data) -> encoded columns.

    Unseen categories map to the out-of-vocabulary id; a missing column or value counts as missing
    (padding id, or the train mean for numbers); extra columns are ignored. List fields take Python
    lists or strings joined by the field's separator ("Comedy|Drama"). A number that does not parse or a
    list in a single-valued column raises a DataError naming `where`, the row (counting from 1) and the column.
    """
    encoded = {}
    for f in spec.fields:
        values = rows[f.name] if f.name in rows else pd.Series([None] * len(rows), index=rows.index, dtype=object)
        if f.is_list:
            values = values.map(partial(list_keys, separator=f.separator))
        elif f.kind == "categorical":
            listed = values.map(lambda v: isinstance(v, list | tuple | np.ndarray))
            if listed.any():
                i = first_bad(listed)
                raise DataError(f"{where}: row {i + 1}, column {f.name!r}: a list ({plain(values.iloc[i])!r})"
                                " where the model takes one value; pass a single value")
            values = values.astype(object).map(vocab_key)
        else:
            present = values.astype(object).map(vocab_key).notna()  # missing: None, NaN, NA, "", "nan"
            numbers = pd.to_numeric(values.where(present), errors="coerce")
            bad = numbers.isna() & present
            if bad.any():
                i = first_bad(bad)
                raise DataError(f"{where}: row {i + 1}, column {f.name!r}: {plain(values.iloc[i])!r} is not a"
                                " number; fix it or leave it empty (an empty value is scored as missing: the train"
                                " mean)")
            bad = out_of_range(numbers)
            if bad.any():
                i = first_bad(bad)
                raise DataError(f"{where}: row {i + 1}, column {f.name!r}: {plain(values.iloc[i])!r} is out of"
                                " range (finite, at most 2^53 in size, as in training); fix it or leave it empty")
            values = numbers
        encoded[f.name] = encode_column(values, f, spec)
    return pd.DataFrame(encoded, index=rows.index)


class Scorer:
    """Click probabilities for raw feature rows, from an exported model.

    Args:
        model: the CTR model (eval mode).
        spec: its feature spec.
        batch_size: rows scored per forward pass.
    """

    def __init__(self, model: CTRModel, spec: FeatureSpec, batch_size: int = 4096) -> None:
        self.model, self.spec, self.batch_size = model.eval(), spec, batch_size

    def __call__(self, rows: pd.DataFrame, where: str = "rows") -> np.ndarray:
        """A column of the model's features that `rows` lacks counts as missing values (a new user's row may
        come without a user id); rows that share no column with the model are refused: nothing to score on."""
        return self.predict(self.encode(rows, where))

    def encode(self, rows: pd.DataFrame, where: str = "rows") -> pd.DataFrame:
        """`rows` encoded for the model (`encode_rows`), refused when they share no column with it."""
        if not set(self.spec.names) & set(rows.columns):
            raise DataError(f"{where}: none of its columns ({', '.join(map(str, rows.columns[:10])) or 'none'}) is a"
                            f" feature of the model ({', '.join(self.spec.names[:10])}); name the columns as in the"
                            " training data")
        return encode_rows(rows.reset_index(drop=True), self.spec, where)

    def predict(self, encoded: pd.DataFrame) -> np.ndarray:
        """Click probabilities of encoded rows (`encode`), in batches of `batch_size`."""
        tensors = frame_to_tensors(encoded, self.spec)
        out = []
        with torch.inference_mode():
            for start in range(0, len(encoded), self.batch_size):
                batch = {k: v[start:start + self.batch_size] for k, v in tensors.items()}
                out.append(torch.sigmoid(self.model(batch)))
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def load_scorer(export_dir: str | Path, batch_size: int = 4096) -> Scorer:
    return Scorer(*load_model(export_dir), batch_size=batch_size)
