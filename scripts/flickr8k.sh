#!/usr/bin/env bash
# README "Flickr8k captions from scratch": train configs/flickr8k.yaml (small CNN from
# scratch at 224 px, 10 epochs) on the 1,000-image subset, evaluate the 100 test images
# against their 5 references with greedy decoding and beam 3, print the table.
#
# FLICKR8K_DIR: the folder with captions.txt and images/ (default
# $CAPTIONER_DATA/flickr8k, i.e. ../shared/data/flickr8k). METEOR needs pycocoevalcap and
# Java; without them it is reported as unavailable.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
FLICKR8K_DIR="${FLICKR8K_DIR:-$DATA/flickr8k}"
RUN="$RUNS/flickr8k"
need_file "$FLICKR8K_DIR/captions.txt" "the Flickr8k captions (captions.txt)" FLICKR8K_DIR
need_dir "$FLICKR8K_DIR/images" "the Flickr8k images folder" FLICKR8K_DIR
budget "about 20 minutes on 2 CPU cores: training ~15 min, two evaluations"

captioner train --config flickr8k --run-dir "$RUN" \
  --set "data.path=$FLICKR8K_DIR/captions.txt" ${EXTRA[@]+"${EXTRA[@]}"}
captioner evaluate --run "$RUN" --out "$RUN/eval-greedy" --strategy greedy
captioner evaluate --run "$RUN" --out "$RUN/eval-beam3" --beam-size 3
summarize captions "greedy=$RUN/eval-greedy" "beam 3=$RUN/eval-beam3"
elapsed
