#!/usr/bin/env bash
# README "Serve it": the serving load test. Trains the demo model if runs/demo is not there
# (as `make demo` does), then `captioner bench-serve`: the server in a subprocess on a
# loopback port, 1, 8 and 32 concurrent keep-alive clients sending REQUESTS requests each
# (one 112 px shapes image per request), batching on (max batch 32, 10 ms window) and off
# (one image at a time). Prints the Markdown table of requests/s and p50/p99 latency.
#
# Run it on an idle machine: the server and the load generator share the cores.
# REQUESTS (default 512) sets the requests per client count.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
REQUESTS="${REQUESTS:-512}"
budget "about 3 minutes for the demo model if missing, then about 1 minute of load"
if [[ ! -f "$RUNS/demo/config.json" ]]; then
  captioner demo --run-dir "$RUNS/demo" ${EXTRA[@]+"${EXTRA[@]}"}
fi
images=("$RUNS"/data/shapes/images/shape_0000*.png)
[[ -f "${images[0]}" ]] || die "no demo images under $RUNS/data/shapes/images (run scripts/demo.sh)"
captioner bench-serve --run "$RUNS/demo" "${images[@]}" --clients 1 8 32 \
  --requests "$REQUESTS"
elapsed
