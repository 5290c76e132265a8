#!/usr/bin/env bash
# README "Speed", "oneDNN on every CPU": the same benchmarks with TensorFlow's oneDNN CPU
# kernels off and on (TF_ENABLE_ONEDNN_OPTS=0 / 1), alternating, REPEATS times (default
# 2): the default shapes (train, greedy, beam 3; --steps 20) and the QM9 recipe's train
# step from pictures (bench --config smiles_qm9, --steps 15). `python -m captioner` sets
# TF_ENABLE_ONEDNN_OPTS=1 unless the environment already sets it; TensorFlow on its own
# turns oneDNN on, on Linux, only for CPUs with VNNI, AVX512-BF16 or AMX instructions.
#
# Needs the QM9 CSV (CAPTIONER_DATA, default ../shared/data). Run it on an idle machine.
# JSON lines go to runs/bench/onednn_<0|1>_<i>.json and qm9_onednn_<0|1>_<i>.json.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
CSV="$DATA/molecules/qm9.csv"
need_file "$CSV" "QM9 CSV" CAPTIONER_DATA
OUT="$RUNS/bench"
mkdir -p "$OUT"
budget "about 3 minutes per repeat on 2 CPU cores, ${REPEATS:-2} repeats"

defaults=()
steps=()
for ((i = 1; i <= ${REPEATS:-2}; i++)); do
  for v in 0 1; do
    export TF_ENABLE_ONEDNN_OPTS="$v"
    captioner bench --steps 20 > "$OUT/onednn_${v}_$i.json"
    defaults+=("oneDNN $v ($i)=$OUT/onednn_${v}_$i.json")
    captioner bench --config smiles_qm9 --set "data.path=$CSV" --steps 15 \
      > "$OUT/qm9_onednn_${v}_$i.json"
    steps+=("oneDNN $v ($i)=$OUT/qm9_onednn_${v}_$i.json")
  done
done
summarize bench "${defaults[@]}"
summarize steps "${steps[@]}"
elapsed
