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

budget() { echo "== $SCRIPT: $* =="; }
elapsed() { printf '== %s: done in %dm%02ds ==\n' "$SCRIPT" $((SECONDS / 60)) $((SECONDS % 60)); }
summarize() { "$PYTHON" "$ROOT/scripts/summarize.py" "$@"; }
