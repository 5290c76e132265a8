"""README "Choosing among the beam's candidates": one beam search, every set of views.

    python scripts/rescore_views.py RUN EVAL_DIR [--beam-size 5] [--limit N] [--json OUT]

EVAL_DIR is a folder written by ``captioner evaluate --style ...`` (its ``manifest.csv``
names the drawn pictures and their molecules). The run's beam search reads each picture
once; every candidate is scored once in every view of ``Choices().rescore_view``
(teacher forcing, :func:`captioner.generate.rescoring.make_score_function`); then, for
every set of views that includes ``identity``, the candidates are ranked as
``decode.rescore_views`` ranks them (valid SMILES first when the run re-ranks, then by
the views' summed log-probability) and exact match is printed, best first, beside the
beam's own first choice and the share of pictures whose molecule is among the
candidates. ``captioner evaluate --rescore-views`` gives the same numbers for one set.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from captioner.choices import Choices
from captioner.data.chem import canonical_smiles
from captioner.data.images import image_batches
from captioner.data.manifests import read_csv_manifest
from captioner.generate.captioner import Captioner


def read_manifest(eval_dir: Path, limit: int | None) -> tuple[list[Path], list[str]]:
    """The pictures ``evaluate`` drew into ``eval_dir`` and their molecules, the first ``limit``."""
    records = read_csv_manifest(eval_dir / "manifest.csv", text_column="smiles")[:limit]
    return [Path(r.image) for r in records], [r.text for r in records]


def beam_and_views(cap: Captioner, paths: list[Path], beam_size: int,
                   views: tuple[str, ...]) -> tuple[list[list[str]], np.ndarray]:
    """Candidate texts per picture (beam order) and their scores (P, V, K) in ``views``."""
    pixels, _ = cap.load_images(paths)
    beam = cap.compiled(cap.options(strategy="beam", beam_size=beam_size, n_best=beam_size))
    scorer = cap.scorer(views)
    texts, scores = [], []
    end, pad = cap.tokenizer.end_id, cap.tokenizer.pad_id
    for i, batch in enumerate(image_batches(pixels, cap.config.decode.batch_size)):
        out = beam(tf.constant(batch), tf.constant(cap.config.decode.max_length),
                   tf.constant([0, i], tf.int32))
        scores.append(scorer(tf.constant(batch), out["tokens"]).numpy())  # (B, V, K)
        for row in out["tokens"].numpy():
            texts.append([cap.tokenizer.decode([t for t in seq if t not in (end, pad)])
                          for seq in row])
    return texts, np.concatenate(scores)


def exact_by_views(texts: list[list[str]], scores: np.ndarray, references: list[str],
                   views: tuple[str, ...], rerank: bool) -> dict[str, float]:
    """Exact match of the first candidate for every set of views holding ``identity``."""
    truth = [canonical_smiles(r) for r in references]
    canon = [[canonical_smiles(t) if t else None for t in row] for row in texts]
    invalid = np.array([[rerank and c is None for c in row] for row in canon])  # (P, K)
    right = np.array([[c is not None and c == t for c in row] for row, t in zip(canon, truth)])
    others = [v for v in views if v != "identity"]
    out = {}
    for n in range(len(others) + 1):
        for chosen in itertools.combinations(others, n):
            picked = [views.index(v) for v in ("identity", *chosen)]
            total = scores[:, picked].sum(1)  # (P, K)
            first = np.lexsort((-total, invalid), axis=1)[:, 0]  # valid first, then total
            out[",".join(("identity", *chosen))] = float(right[np.arange(len(first)),
                                                               first].mean())
    out["top_k"] = float(right.any(1).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("eval_dir", type=Path)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    cap = Captioner.load(args.run)
    views = Choices().rescore_view
    paths, references = read_manifest(args.eval_dir, args.limit)
    texts, scores = beam_and_views(cap, paths, args.beam_size, views)
    result = exact_by_views(texts, scores, references, views,
                            cap.config.decode.rerank_valid_smiles)
    top_k = result.pop("top_k")
    print(f"{len(paths)} pictures of {args.eval_dir}, beam {args.beam_size}; the molecule is "
          f"among the candidates for {top_k:.3f}\n")
    print("| views | exact match |\n| --- | --- |")
    for name, value in sorted(result.items(), key=lambda kv: -kv[1]):
        print(f"| {name.replace(',', ', ')} | {value:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({**result, "top_k": top_k}, indent=1) + "\n")


if __name__ == "__main__":
    main()
