#!/usr/bin/env bash
# README "SMILES from pictures of QM9 molecules", reading each picture at several margins:
# a trained QM9 run (RUN, default $RUNS/qm9, as scripts/qm9.sh leaves it) reads the
# molecules of SPLIT (default val, so no choice is made on the test molecules) drawn in
# each style of STYLES (`captioner evaluate`, greedy, which draws them), then
# scripts/margin_views.py reads those pictures cut at five margins with beam 5 and prints
# exact match at each margin, by vote and by the teacher-forced union of the candidates.
# Nothing is trained. EVAL_LIMIT (default 500) bounds every evaluation.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
RUN="${RUN:-$RUNS/qm9}"
need_dir "$RUN" "the trained QM9 run (scripts/qm9.sh)" RUN
SPLIT="${SPLIT:-val}"
read -r -a styles <<< "${STYLES:-rdkit_default:224 thin_rotated_bw:256 indigo_default:224 openbabel_default:224}"
limit=(--limit "${EVAL_LIMIT:-500}")
budget "about 1.5 minutes per style with EVAL_LIMIT=500 on 2 CPU cores (AVX-512 bfloat16)"
for entry in "${styles[@]}"; do
  style="${entry%%:*}" size="${entry##*:}"
  out="$RUN/eval-margins-$SPLIT-$style"
  captioner evaluate --run "$RUN" --split "$SPLIT" --out "$out" --style "$style" \
    --size "$size" --strategy greedy "${limit[@]}"
  echo "+ margin_views.py $RUN $out" >&2
  "$PYTHON" "$ROOT/scripts/margin_views.py" "$RUN" "$out" --json "$out/margins.json" "${limit[@]}"
done
elapsed
