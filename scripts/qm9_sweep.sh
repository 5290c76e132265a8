#!/usr/bin/env bash
# README "SMILES from pictures of QM9 molecules": the QM9 recipe (configs/smiles_qm9.yaml)
# trained for 2 short epochs once per value of one config key, with the same seed,
# molecules, split and drawn pictures; prints each run's training curve (validation: 500
# molecules drawn once from the training mix).
#
#   KEY=train.attention_supervision VALUES="0 0.1 0.3 1 3"  (the default: attention
#       supervised by atom positions)
#   KEY=train.learning_rate VALUES="0.002 0.004 0.008 0.016"  (the learning-rate sweep)
#
# QM9_CSV: the SMILES file (default $CAPTIONER_DATA/molecules/qm9.csv); STEPS: training
# steps per epoch (default 500). Runs go to $RUNS/qm9_sweep/NAME_VALUE (NAME: the key's
# last part, e.g. learning_rate_0.004).
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
QM9_CSV="${QM9_CSV:-$DATA/molecules/qm9.csv}"
STEPS="${STEPS:-500}"
KEY="${KEY:-train.attention_supervision}"
read -r -a values <<< "${VALUES:-0 0.1 0.3 1 3}"
need_file "$QM9_CSV" "the QM9 SMILES (qm9.csv)" QM9_CSV
budget "training ~6.5 min per value on 2 CPU cores (2 epochs x $STEPS steps of 64 new pictures), ${#values[@]} values of $KEY"
curves=()
for v in "${values[@]}"; do
  run="$RUNS/qm9_sweep/${KEY##*.}_$v"
  captioner train --config smiles_qm9 --run-dir "$run" --set "data.path=$QM9_CSV" \
    --set train.epochs=2 --set "train.max_steps_per_epoch=$STEPS" \
    --set "$KEY=$v" ${EXTRA[@]+"${EXTRA[@]}"}
  curves+=("$KEY $v=$run")
done
summarize curve "${curves[@]}"
elapsed
