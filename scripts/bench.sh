#!/usr/bin/env bash
# README "Speed": the four columns of the speed table (ours and the tutorial's structure,
# float32 and mixed_bfloat16, default shapes, --steps 20), one process each, one after the
# other, then the table. ALL=1 adds the runs quoted in the text: the tutorial's feature
# shape (--grid 64 --feature-dim 2048, both implementations), without the kernels
# (--attention-kernel tensorflow), --attend after, mixed_float16 and --end-to-end.
#
# No data needed (random grids; --end-to-end writes its own images). Run it on an idle
# machine: other work lowers every number (each result records load_average). JSON lines
# go to runs/bench/<name>.json. BENCH_ARGS adds flags to every run (e.g. "--steps 2").
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
OUT="$RUNS/bench"
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"
mkdir -p "$OUT"
RUNS_TABLE=("ours_float32=--impl captioner --precision float32"
            "ours_mixed_bfloat16=--impl captioner --precision mixed_bfloat16"
            "classic_float32=--impl classic --precision float32"
            "classic_mixed_bfloat16=--impl classic --precision mixed_bfloat16")
RUNS_TEXT=("ours_inception_shape=--impl captioner --grid 64 --feature-dim 2048"
           "classic_inception_shape=--impl classic --grid 64 --feature-dim 2048"
           "ours_tensorflow_ops=--impl captioner --attention-kernel tensorflow"
           "ours_attend_after=--impl captioner --attend after"
           "ours_mixed_float16=--impl captioner --precision mixed_float16"
           "ours_end_to_end=--impl captioner --end-to-end")
todo=("${RUNS_TABLE[@]}")
if [[ "${ALL:-0}" == 1 ]]; then todo+=("${RUNS_TEXT[@]}"); fi
budget "about 2 minutes per run on 2 CPU cores (classic longer: ~25 s to compile), ${#todo[@]} runs"

files=()
for spec in "${todo[@]}"; do
  name="${spec%%=*}"
  bench_spec "$spec" "$OUT/$name.json" --steps 20 ${BENCH_EXTRA[@]+"${BENCH_EXTRA[@]}"}
  files+=("$name=$OUT/$name.json")
done
summarize bench "${files[@]}"
elapsed
