#!/usr/bin/env bash
# README "SMILES from pictures of ZINC molecules": the ZINC recipe's train step from
# pictures (`bench --config smiles_zinc`, batch 64 at 192 px, mixed_bfloat16) with the
# first recipe's mirrored padding and 32/64 first/second-stage filters, zero padding with
# 16 first-stage filters, and the recipe now (zero padding, 16/32), REPEATS times
# alternating (default 3), then the table. Run it on an idle machine (each line records
# load_average). JSON lines go to runs/bench/zinc_<name>_<i>.json.
#
# ZINC_CSV: the SMILES file whose first molecules are drawn (default
# $CAPTIONER_DATA/molecules/zinc.csv).
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
ZINC_CSV="${ZINC_CSV:-$DATA/molecules/zinc.csv}"
need_file "$ZINC_CSV" "the ZINC SMILES (zinc.csv)" ZINC_CSV
VARIANTS=("mirrored_32_64=--set model.cnn_padding=reflect --set model.cnn_filters=[32,64,128,192,256]"
          "zero_16_64=--set model.cnn_padding=same --set model.cnn_filters=[16,64,128,192,256]"
          "recipe_zero_16_32=--set model.cnn_padding=same --set model.cnn_filters=[16,32,128,192,256]")
budget "about 20 s per run on 2 CPU cores, ${#VARIANTS[@]} x ${REPEATS:-3} runs"
step_table zinc smiles_zinc "$ZINC_CSV" 10 "${VARIANTS[@]}"
elapsed
