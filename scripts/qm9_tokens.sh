#!/usr/bin/env bash
# README "SMILES or SELFIES tokens": the QM9 recipe (configs/smiles_qm9.yaml, with the
# 128-px, 32-filter, mirrored-padding CNN it had then) trained twice on a shorter budget,
# once with each tokenizer (tokenizer.kind smiles | selfies), with the same seed,
# molecules, split and drawn pictures; both read the held-out molecules drawn by RDKit
# defaults at 224 px and thin, rotated black-and-white at 256 px.
#
# QM9_CSV: the SMILES file (default $CAPTIONER_DATA/molecules/qm9.csv); STEPS: training
# steps per epoch (default 600, 2 epochs); EVAL_LIMIT bounds the evaluations.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
QM9_CSV="${QM9_CSV:-$DATA/molecules/qm9.csv}"
STEPS="${STEPS:-600}"
need_file "$QM9_CSV" "the QM9 SMILES (qm9.csv)" QM9_CSV
budget "training ~2 x 16 min on 2 CPU cores (2 epochs x $STEPS steps of 64 new pictures each), evaluation ~6 min"
limit=()
[[ -n "${EVAL_LIMIT:-}" ]] && limit=(--limit "$EVAL_LIMIT")
# the recipe's image side as it was when the README's table was measured
THEN=(--set model.image_size=128 --set "model.cnn_filters=[32,64,128,192]"
      --set model.cnn_padding=reflect)
for kind in smiles selfies; do
  run="$RUNS/qm9_tokens_$kind"
  captioner train --config smiles_qm9 --run-dir "$run" --set "data.path=$QM9_CSV" \
    --set "tokenizer.kind=$kind" --set train.epochs=2 --set "train.max_steps_per_epoch=$STEPS" \
    "${THEN[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
  captioner evaluate --run "$run" --out "$run/eval-rdkit_default" --style rdkit_default \
    --size 224 --strategy greedy ${limit[@]+"${limit[@]}"}
  captioner evaluate --run "$run" --out "$run/eval-thin_rotated_bw" --style thin_rotated_bw \
    --size 256 --strategy greedy ${limit[@]+"${limit[@]}"}
done
summarize smiles "SMILES tokens, RDKit defaults 224 px=$RUNS/qm9_tokens_smiles/eval-rdkit_default" \
  "SELFIES tokens, RDKit defaults 224 px=$RUNS/qm9_tokens_selfies/eval-rdkit_default" \
  "SMILES tokens, thin rotated 256 px=$RUNS/qm9_tokens_smiles/eval-thin_rotated_bw" \
  "SELFIES tokens, thin rotated 256 px=$RUNS/qm9_tokens_selfies/eval-thin_rotated_bw"
summarize curve "SMILES tokens=$RUNS/qm9_tokens_smiles" "SELFIES tokens=$RUNS/qm9_tokens_selfies"
elapsed
