#!/usr/bin/env bash
# README "SMILES from pictures of QM9 molecules": train configs/smiles_qm9.yaml on every
# QM9 molecule but the held-out ones (split by canonical SMILES), each training example a
# new drawing (RDKit or Indigo in varied styles, scan-like damage), then evaluate the
# held-out molecules drawn in several styles and print the tables (smiles_recipe, lib.sh).
#
# QM9_CSV: the SMILES file (default $CAPTIONER_DATA/molecules/qm9.csv, i.e.
# ../shared/data/molecules/qm9.csv); EVAL_LIMIT / OSRA_LIMIT bound the evaluations.
# RUN (default runs/qm9): the run directory; EVAL_ONLY=1 evaluates it without training.
# MARGIN_VIEWS (default 0.05,0.1,0.15,0.2,0.25; empty: none): RDKit defaults and thin rotated
# lines are also read with beam 5 cut at these margins, the readings pooled.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
QM9_CSV="${QM9_CSV:-$DATA/molecules/qm9.csv}"
need_file "$QM9_CSV" "the QM9 SMILES (qm9.csv)" QM9_CSV
MARGIN_VIEWS="${MARGIN_VIEWS-0.05,0.1,0.15,0.2,0.25}"
budget "training 58 min (train.max_minutes: as many steps of 64 new pictures as fit, at most 10 epochs of 1,904; ~6 epochs at 230 pictures/s with bfloat16, far fewer in float32); evaluation ~5 min, ~5 more with OSRA, ~5 more for the two readings at five margins"
smiles_recipe qm9 "$QM9_CSV"
elapsed
