#!/usr/bin/env bash
# README "SMILES from pictures of ZINC molecules": train configs/smiles_zinc.yaml on every
# ZINC molecule but the held-out ones (split by canonical SMILES), drawn while training like
# QM9, then evaluate the held-out molecules drawn in several styles (smiles_recipe, lib.sh).
#
# ZINC_CSV: the SMILES file (default $CAPTIONER_DATA/molecules/zinc.csv); EVAL_LIMIT /
# OSRA_LIMIT bound the evaluations; EXTRA_ARGS="--set train.epochs=N" changes the budget.
# RUN (default runs/zinc): the run directory; EVAL_ONLY=1 evaluates it without training.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
ZINC_CSV="${ZINC_CSV:-$DATA/molecules/zinc.csv}"
need_file "$ZINC_CSV" "the ZINC SMILES (zinc.csv)" ZINC_CSV
budget "training at most 88 min (train.max_minutes; 5 x 1100 steps of 64 new pictures at 192 px where they fit, ~0.9 s per step), evaluation ~10 min"
smiles_recipe zinc "$ZINC_CSV"
elapsed
