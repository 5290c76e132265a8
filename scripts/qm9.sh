#!/usr/bin/env bash
# README "SMILES from pictures of QM9 molecules": render a seeded sample of 25,000 QM9
# SMILES at 224 px, train configs/smiles_qm9.yaml (12 epochs), evaluate the held-out
# molecules with greedy decoding and with beam 5 (valid-SMILES re-ranking), print the table.
#
# QM9_CSV: the SMILES file (default $CAPTIONER_DATA/molecules/qm9.csv, i.e.
# ../shared/data/molecules/qm9.csv). QM9_SAMPLE (default 25000) and QM9_IMAGES (default
# runs/data/qm9_224) change the sample and where it is rendered. Needs RDKit.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
QM9_CSV="${QM9_CSV:-$DATA/molecules/qm9.csv}"
QM9_SAMPLE="${QM9_SAMPLE:-25000}"
QM9_IMAGES="${QM9_IMAGES:-$RUNS/data/qm9_224}"
RUN="$RUNS/qm9"
need_file "$QM9_CSV" "the QM9 SMILES (qm9.csv)" QM9_CSV
"$PYTHON" -c "import rdkit" 2>/dev/null || die "RDKit is needed to render molecules: pip install rdkit"
budget "about an hour on 2 CPU cores: rendering a few minutes, training ~45 min, evaluation ~5 min"

captioner render-molecules --smiles "$QM9_CSV" --out "$QM9_IMAGES" --size 224 \
  --sample "$QM9_SAMPLE" --seed 0
captioner train --config smiles_qm9 --run-dir "$RUN" \
  --set "data.path=$QM9_IMAGES/manifest.csv" ${EXTRA[@]+"${EXTRA[@]}"}
captioner evaluate --run "$RUN" --out "$RUN/eval-greedy" --strategy greedy
captioner evaluate --run "$RUN" --out "$RUN/eval-beam5" --beam-size 5
summarize smiles "greedy=$RUN/eval-greedy" "beam 5, valid-SMILES re-ranking=$RUN/eval-beam5"
elapsed
