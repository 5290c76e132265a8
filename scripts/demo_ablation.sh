#!/usr/bin/env bash
# README "Why the demo config differs from the defaults": the shapes demo (same data, seed
# and 8 epochs) for each combination of model.attend, train.attention_reg and
# model.cnn_padding in the table, then exact match and grounding per row.
#
# Runs go to runs/ablation/<attend>_<reg>_<padding> (resumed if present; FRESH=1 deletes
# them first). The table's colour / shape split is not computed by `evaluate`.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
SHAPES_DIR="${SHAPES_DIR:-$RUNS/data/shapes}"
ROWS=("before 1.0 same" "before 0.0 same" "after 1.0 same" "after 0.0 same"
      "before 0.0 reflect" "after 0.0 reflect")
budget "about 3 minutes per row, ${#ROWS[@]} rows (about 20 minutes) on 2 CPU cores"

runs=()
for row in "${ROWS[@]}"; do
  read -r attend reg padding <<< "$row"
  run_dir="$RUNS/ablation/${attend}_${reg}_${padding}"
  if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$run_dir"; fi
  captioner demo --run-dir "$run_dir" --set "data.path=$SHAPES_DIR" \
    --set "model.attend=$attend" --set "train.attention_reg=$reg" \
    --set "model.cnn_padding=$padding" ${EXTRA[@]+"${EXTRA[@]}"}
  runs+=("attend $attend, reg $reg, $padding=$run_dir")
done
summarize demo "${runs[@]}"
elapsed
