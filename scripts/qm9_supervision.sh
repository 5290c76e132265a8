#!/usr/bin/env bash
# README "Attention supervised by atom positions": the QM9 recipe (configs/smiles_qm9.yaml)
# trained for 2 short epochs once per weight of train.attention_supervision (0 = off),
# with the same seed, molecules, split and drawn pictures; prints each run's training
# curve (validation: 500 molecules drawn once from the training mix).
#
# QM9_CSV: the SMILES file (default $CAPTIONER_DATA/molecules/qm9.csv); STEPS: training
# steps per epoch (default 500); WEIGHTS: the weights tried (default "0 0.1 0.3 1 3").
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
QM9_CSV="${QM9_CSV:-$DATA/molecules/qm9.csv}"
STEPS="${STEPS:-500}"
read -r -a weights <<< "${WEIGHTS:-0 0.1 0.3 1 3}"
need_file "$QM9_CSV" "the QM9 SMILES (qm9.csv)" QM9_CSV
budget "training ~6.5 min per weight on 2 CPU cores (2 epochs x $STEPS steps of 64 new pictures), ${#weights[@]} weights"
curves=()
for w in "${weights[@]}"; do
  run="$RUNS/qm9_supervision_$w"
  captioner train --config smiles_qm9 --run-dir "$run" --set "data.path=$QM9_CSV" \
    --set train.epochs=2 --set "train.max_steps_per_epoch=$STEPS" \
    --set "train.attention_supervision=$w" ${EXTRA[@]+"${EXTRA[@]}"}
  curves+=("weight $w=$run")
done
summarize curve "${curves[@]}"
elapsed
