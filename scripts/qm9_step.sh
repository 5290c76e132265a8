#!/usr/bin/env bash
# README "SMILES from pictures of QM9 molecules" (what was measured on the way): the QM9
# recipe's train step from pictures (`bench --config smiles_qm9`, batch 64 at 128 px,
# mixed_bfloat16) with mirrored and zero padding, 32 or 16 first-stage filters, and the
# drawing rate, REPEATS times alternating (default 3), then the table. Run it on an idle
# machine (each line records load_average). JSON lines go to runs/bench/qm9_<name>_<i>.json.
#
# QM9_CSV: the SMILES file whose first molecules are drawn (default
# $CAPTIONER_DATA/molecules/qm9.csv).
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
QM9_CSV="${QM9_CSV:-$DATA/molecules/qm9.csv}"
need_file "$QM9_CSV" "the QM9 SMILES (qm9.csv)" QM9_CSV
OUT="$RUNS/bench"
mkdir -p "$OUT"
VARIANTS=("mirrored_32=--set model.cnn_padding=reflect --set model.cnn_filters=[32,64,128,192]"
          "zero_32=--set model.cnn_padding=same --set model.cnn_filters=[32,64,128,192]"
          "zero_16=--set model.cnn_padding=same --set model.cnn_filters=[16,64,128,192]")
budget "about 15 s per run on 2 CPU cores, ${#VARIANTS[@]} x ${REPEATS:-3} runs"
files=()
for ((i = 1; i <= ${REPEATS:-3}; i++)); do
  for spec in "${VARIANTS[@]}"; do
    name="${spec%%=*}"
    read -r -a flags <<< "${spec#*=}"
    captioner bench --config smiles_qm9 --set "data.path=$QM9_CSV" "${flags[@]}" --steps 15 \
      > "$OUT/qm9_${name}_$i.json"
    files+=("$name ($i)=$OUT/qm9_${name}_$i.json")
  done
done
summarize steps "${files[@]}"
elapsed
