#!/usr/bin/env bash
# README "SMILES from pictures of QM9 molecules" (what was measured on the way): the QM9
# recipe's train step from pictures (`bench --config smiles_qm9`, batch 64, mixed_bfloat16)
# with mirrored and zero padding, 32 or 16 first-stage filters, 64 or 32 second-stage
# filters, 128 or 112 px pictures (and batch 128, 192 GRU units), and the drawing rate,
# REPEATS times alternating (default 3), then the table. Run it on an idle
# machine (each line records load_average). JSON lines go to runs/bench/qm9_<name>_<i>.json.
#
# QM9_CSV: the SMILES file whose first molecules are drawn (default
# $CAPTIONER_DATA/molecules/qm9.csv).
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
QM9_CSV="${QM9_CSV:-$DATA/molecules/qm9.csv}"
need_file "$QM9_CSV" "the QM9 SMILES (qm9.csv)" QM9_CSV
F16="--set model.cnn_filters=[16,64,128,192]"
VARIANTS=("mirrored_32=--set model.cnn_padding=reflect --set model.cnn_filters=[32,64,128,192] --set model.image_size=128"
          "zero_32=--set model.cnn_padding=same --set model.cnn_filters=[32,64,128,192] --set model.image_size=128"
          "zero_16=--set model.cnn_padding=same $F16 --set model.image_size=128"
          "zero_16_batch128=--set model.cnn_padding=same $F16 --set model.image_size=128 --set train.batch_size=128"
          "zero_16_units192=--set model.cnn_padding=same $F16 --set model.image_size=128 --set model.units=192"
          "zero_16_32=--set model.cnn_padding=same --set model.cnn_filters=[16,32,128,192] --set model.image_size=128"
          "zero_16_112px=--set model.cnn_padding=same $F16 --set model.image_size=112"
          "zero_16_32_112px=--set model.cnn_padding=same --set model.cnn_filters=[16,32,128,192] --set model.image_size=112")
budget "about 15 s per run on 2 CPU cores, ${#VARIANTS[@]} x ${REPEATS:-3} runs"
step_table qm9 smiles_qm9 "$QM9_CSV" 15 "${VARIANTS[@]}"
elapsed
