#!/usr/bin/env bash
# README "Results" (the shapes demo): `captioner demo` in float32 (what `make demo` runs)
# and with --set train.precision=mixed_bfloat16, then the table's numbers.
#
# The data is generated (SHAPES_DIR, default runs/data/shapes). A run whose directory exists
# resumes or only re-evaluates; FRESH=1 deletes this script's run directories first (the
# README's timing is from an empty runs/). PRECISIONS picks the columns.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
SHAPES_DIR="${SHAPES_DIR:-$RUNS/data/shapes}"
PRECISIONS="${PRECISIONS:-float32 mixed_bfloat16}"
budget "about 3 minutes per precision on 2 CPU cores: generate 6,000 images, 8 epochs, evaluate 600"

runs=()
for precision in $PRECISIONS; do
  run_dir="$RUNS/demo"
  [[ "$precision" == float32 ]] || run_dir="$RUNS/demo_$precision"
  if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$run_dir"; fi
  captioner demo --run-dir "$run_dir" --set "data.path=$SHAPES_DIR" \
    --set "train.precision=$precision" ${EXTRA[@]+"${EXTRA[@]}"}
  runs+=("$precision=$run_dir")
done
summarize demo "${runs[@]}"
elapsed
