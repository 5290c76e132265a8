#!/usr/bin/env bash
# README "SMILES from pictures of QM9 molecules", choosing among the beam's candidates: a
# trained QM9 run (RUN, default $RUNS/qm9, as scripts/qm9.sh leaves it) reads the held-out
# molecules drawn in each style of STYLES greedy (`captioner evaluate`, which draws them),
# then scripts/rescore_views.py runs beam 5 once on those pictures and prints exact match
# for the beam's own first choice and for every set of views (decode.rescore_views), and
# `captioner evaluate --rescore-views VIEWS` (default identity,rot90,rot180,rot270) checks
# one set through the command line on the RDKit-default pictures. Nothing is trained.
# EVAL_LIMIT bounds every evaluation.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
RUN="${RUN:-$RUNS/qm9}"
need_dir "$RUN" "the trained QM9 run (scripts/qm9.sh)" RUN
VIEWS="${VIEWS:-identity,rot90,rot180,rot270}"
read -r -a styles <<< "${STYLES:-rdkit_default:224 thin_rotated_bw:256 indigo_default:224 openbabel_default:224}"
limit=()
[[ -n "${EVAL_LIMIT:-}" ]] && limit=(--limit "$EVAL_LIMIT")
budget "8 minutes in all with EVAL_LIMIT=500 on 2 CPU cores (no AVX-512); about 5x that for all 2,539 pictures"
for entry in "${styles[@]}"; do
  style="${entry%%:*}" size="${entry##*:}"
  out="$RUN/eval-views-$style"
  captioner evaluate --run "$RUN" --out "$out" --style "$style" --size "$size" \
    --strategy greedy ${limit[@]+"${limit[@]}"}
  echo "+ rescore_views.py $RUN $out" >&2
  "$PYTHON" "$ROOT/scripts/rescore_views.py" "$RUN" "$out" --json "$out/views.json" \
    ${limit[@]+"${limit[@]}"}
done
captioner evaluate --run "$RUN" --out "$RUN/eval-views-rdkit_default-beam5" \
  --style rdkit_default --size 224 --beam-size 5 --n-best 5 --rescore-views "$VIEWS" \
  ${limit[@]+"${limit[@]}"}
summarize smiles "RDKit defaults, beam 5, views $VIEWS=$RUN/eval-views-rdkit_default-beam5"
elapsed
