#!/usr/bin/env bash
# README "SMILES from pictures of QM9 molecules", reading cropped to the ink: a trained QM9
# run (RUN, default $RUNS/qm9, as scripts/qm9.sh leaves it) reads the held-out molecules
# drawn by RDKit, Indigo and Open Babel defaults and in thin rotated lines, greedy, once
# as whole pictures (`--crop-margin none`, whatever the run's decode.crop_margin) and once
# per crop margin (MARGINS, default "0.1 0.15 0.2"; `evaluate --crop-margin`), and RDKit
# defaults with beam 5 cropped at BEAM_MARGIN, then the table. Nothing is trained.
#
# The run's own data is read (its config's data.path, as it was trained).
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
RUN="${RUN:-$RUNS/qm9}"
need_dir "$RUN" "the trained QM9 run (scripts/qm9.sh)" RUN
read -r -a margins <<< "${MARGINS:-0.1 0.15 0.2}"
STYLES=("rdkit_default 224" "indigo_default 224" "openbabel_default 224" "thin_rotated_bw 256")
budget "about 35 s per evaluation on 2 CPU cores, ${#STYLES[@]} styles x $((${#margins[@]} + 1)) readings, and one beam evaluation (~2 min)"
rows=()
for entry in "${STYLES[@]}"; do
  read -r style size <<< "$entry"
  captioner evaluate --run "$RUN" --out "$RUN/eval-crop-$style-whole" --style "$style" \
    --size "$size" --strategy greedy --crop-margin none
  rows+=("$style $size px, whole picture=$RUN/eval-crop-$style-whole")
  for m in "${margins[@]}"; do
    captioner evaluate --run "$RUN" --out "$RUN/eval-crop-$style-$m" --style "$style" \
      --size "$size" --strategy greedy --crop-margin "$m"
    rows+=("$style $size px, cropped, margin $m=$RUN/eval-crop-$style-$m")
  done
done
# beam 5 on the RDKit-default pictures cropped at BEAM_MARGIN (default 0.15), 5 kept
bm="${BEAM_MARGIN:-0.15}"
captioner evaluate --run "$RUN" --out "$RUN/eval-crop-rdkit_default-beam5-$bm" \
  --style rdkit_default --size 224 --beam-size 5 --n-best 5 --crop-margin "$bm"
rows+=("rdkit_default 224 px, cropped, margin $bm, beam 5=$RUN/eval-crop-rdkit_default-beam5-$bm")
summarize smiles "${rows[@]}"
elapsed
