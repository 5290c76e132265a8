# shellcheck shell=bash disable=SC2034  # DATA, RUNS, EXTRA: used by the scripts sourcing this
# Shared by the recipes in scripts/ (sourced, not run): repository root as the working
# directory, the Python that runs `captioner`, data checks and the time budget.
#
# Environment: PYTHON (default .venv/bin/python, else python3), CAPTIONER_DATA (the shared
# data folder, default ../shared/data), RUNS (output root, default runs), EXTRA_ARGS (extra
# flags for every `captioner train`/`demo`, e.g. "--set train.epochs=1" for a smoke run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SCRIPT="$(basename "$0")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
DATA="${CAPTIONER_DATA:-../shared/data}"   # relative to the repository, like the configs
RUNS="${RUNS:-runs}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

die() { echo "$SCRIPT: error: $*" >&2; exit 1; }

# need_file PATH WHAT VARIABLE: stop with a message naming the variable that sets PATH
need_file() { [[ -f "$1" ]] || die "$2 not found at $1 (set $3, or CAPTIONER_DATA for the shared data folder)"; }
need_dir() { [[ -d "$1" ]] || die "$2 not found at $1 (set $3, or CAPTIONER_DATA for the shared data folder)"; }

"$PYTHON" -c "import captioner" 2>/dev/null \
  || die "$PYTHON cannot import captioner: run 'make venv' (or pip install .) first"

# captioner ARGS...: the command line, echoed first
captioner() { echo "+ captioner $*" >&2; "$PYTHON" -m captioner "$@"; }

# bench_spec SPEC FILE [ARGS...]: `captioner bench` with the flags of SPEC ("name=flags",
# as the bench scripts list their runs) and ARGS, its JSON line written to FILE
bench_spec() {
  local spec="$1" file="$2" flags
  shift 2
  read -r -a flags <<< "${spec#*=}"
  captioner bench "${flags[@]}" "$@" > "$file"
}

# step_table PREFIX CONFIG CSV STEPS SPEC...: `captioner bench --config CONFIG` drawing the
# molecules of CSV, STEPS steps, once per SPEC ("name=flags") and REPEATS times alternating
# (default 3), JSON lines in $RUNS/bench/PREFIX_<name>_<i>.json, then the table of steps
step_table() {
  local prefix="$1" config="$2" csv="$3" steps="$4" files=() spec name file i
  shift 4
  mkdir -p "$RUNS/bench"
  for ((i = 1; i <= ${REPEATS:-3}; i++)); do
    for spec in "$@"; do
      name="${spec%%=*}"
      file="$RUNS/bench/${prefix}_${name}_$i.json"
      bench_spec "$spec" "$file" --config "$config" --set "data.path=$csv" --steps "$steps"
      files+=("$name ($i)=$file")
    done
  done
  summarize steps "${files[@]}"
}

budget() { echo "== $SCRIPT: $* =="; }
elapsed() { printf '== %s: done in %dm%02ds ==\n' "$SCRIPT" $((SECONDS / 60)) $((SECONDS % 60)); }
summarize() { "$PYTHON" "$ROOT/scripts/summarize.py" "$@"; }

# smiles_recipe NAME CSV: train configs/smiles_NAME.yaml on the molecules of CSV (drawn while
# training) into $RUNS/NAME, then evaluate the held-out molecules drawn in several styles
# (RDKit defaults greedy + beam 5 with its top 5, Indigo, Open Babel -- not in the training
# mix --, thin rotated black-and-white lines, the training mix; OSRA beside ours where it
# is installed) and print the tables, exact match by molecule size, the kinds of error and
# the training curve.
# EVAL_LIMIT bounds every evaluation, OSRA_LIMIT (default 500) the OSRA ones; RUN (default
# $RUNS/NAME) is the run directory; EVAL_ONLY=1 evaluates RUN as it is, without training.
# MARGIN_VIEWS (e.g. 0.05,0.1,0.15,0.2,0.25; default none) adds RDKit defaults and thin
# rotated lines read with beam 5 at those margins, pooled (evaluate --margin-views).
smiles_recipe() {
  local name="$1" csv="$2" run="${RUN:-$RUNS/$1}" osra_limit="${OSRA_LIMIT:-500}"
  local limit=()
  [[ -n "${EVAL_LIMIT:-}" ]] && limit=(--limit "$EVAL_LIMIT")
  "$PYTHON" -c "import rdkit, indigo, albumentations" 2>/dev/null \
    || die "drawing molecules needs rdkit, epam-indigo and albumentations: pip install -r requirements.txt"
  if [[ "${EVAL_ONLY:-0}" == 1 ]]; then
    need_dir "$run" "the trained run to evaluate" RUN
  else
    captioner train --config "smiles_$name" --run-dir "$run" --set "data.path=$csv" \
      ${EXTRA[@]+"${EXTRA[@]}"}
  fi
  _style() {  # _style OUT STYLE SIZE [flags]: the held-out molecules drawn in STYLE
    local out="$1" style="$2" size="$3"; shift 3
    captioner evaluate --run "$run" --out "$run/eval-$out" --style "$style" --size "$size" "$@"
  }
  _style rdkit_default rdkit_default 224 --strategy greedy ${limit[@]+"${limit[@]}"}
  _style rdkit_default-beam5 rdkit_default 224 --beam-size 5 --n-best 5 \
    ${limit[@]+"${limit[@]}"}
  _style indigo_default indigo_default 224 --strategy greedy ${limit[@]+"${limit[@]}"}
  _style openbabel_default openbabel_default 224 --strategy greedy ${limit[@]+"${limit[@]}"}
  _style thin_rotated_bw thin_rotated_bw 256 --strategy greedy ${limit[@]+"${limit[@]}"}
  _style mix mix 224 --strategy greedy ${limit[@]+"${limit[@]}"}
  summarize smiles "RDKit defaults 224 px, greedy=$run/eval-rdkit_default" \
    "RDKit defaults 224 px, beam 5=$run/eval-rdkit_default-beam5" \
    "Indigo defaults 224 px=$run/eval-indigo_default" \
    "Open Babel defaults 224 px (not in training)=$run/eval-openbabel_default" \
    "thin rotated black-and-white 256 px=$run/eval-thin_rotated_bw" \
    "training mix 224 px=$run/eval-mix"
  if [[ -n "${MARGIN_VIEWS:-}" ]]; then
    local margins=(--beam-size 5 --margin-views "$MARGIN_VIEWS" ${limit[@]+"${limit[@]}"})
    _style rdkit_default-margins rdkit_default 224 "${margins[@]}"
    _style thin_rotated_bw-margins thin_rotated_bw 256 "${margins[@]}"
    summarize smiles "RDKit defaults 224 px, beam 5 at margins $MARGIN_VIEWS=$run/eval-rdkit_default-margins" \
      "thin rotated 256 px, beam 5 at margins $MARGIN_VIEWS=$run/eval-thin_rotated_bw-margins"
  fi
  if command -v osra >/dev/null; then
    _style osra rdkit_default 224 --strategy greedy --limit "$osra_limit" --compare osra --report
    _style osra-thin thin_rotated_bw 256 --strategy greedy --limit "$osra_limit" --compare osra
    summarize smiles "RDKit defaults, first $osra_limit=$run/eval-osra" \
      "thin rotated, first $osra_limit=$run/eval-osra-thin"
  else
    echo "osra is not installed: no OSRA rows (apt-get install osra)"
  fi
  summarize sizes "RDKit defaults=$run/eval-rdkit_default" "thin rotated=$run/eval-thin_rotated_bw"
  summarize errors "RDKit defaults=$run/eval-rdkit_default" \
    "thin rotated=$run/eval-thin_rotated_bw" "Open Babel=$run/eval-openbabel_default"
  summarize curve "$name=$run"
}
