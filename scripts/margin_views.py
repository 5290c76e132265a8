"""README "Reading each picture at several margins": the rules measured side by side.

    python scripts/margin_views.py RUN EVAL_DIR [--limit N] [--beam-size 5] [--json OUT]

EVAL_DIR is a folder written by ``captioner evaluate --style ...`` (its ``manifest.csv``
names the drawn pictures and their molecules; ``--split val`` keeps the test molecules
out of the choice). Each picture is cut to its ink with each margin of ``--margins``
(default 0.05, 0.1, 0.15, 0.2, 0.25) and read by the run's beam search at every margin.
Printed, as exact match of the canonical SMILES: each margin's first valid candidate
(``top1@M``) and whether the molecule is among its candidates (``topK@M``); ``vote``,
the molecule most margins put first (ties go to the run's own margin); and for the
union of every margin's candidates, each scored by teacher forcing at the margins of a
set (the run's own, three around it, all), ``union-<set>``: the molecule whose
spellings' probabilities, multiplied over the set's margins, sum highest.
``union-all`` is what ``decode.margin_views`` (``--margin-views``) decodes.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from captioner.data.chem import canonical_smiles
from captioner.data.images import load_image
from captioner.data.manifests import read_csv_manifest
from captioner.generate.captioner import Captioner
from captioner.generate.rescoring import pool_readings


def pictures_and_molecules(eval_dir: Path, limit: int | None) -> tuple[list[str], list[str]]:
    """The pictures ``evaluate`` drew into ``eval_dir`` and their canonical SMILES."""
    records = read_csv_manifest(eval_dir / "manifest.csv", text_column="smiles")[:limit]
    return [r.image for r in records], [canonical_smiles(r.text) for r in records]


def read_at(cap: Captioner, paths: list[str], margin: float) -> np.ndarray:
    """uint8 (B, S, S, 3): every picture cut to its ink plus ``margin``, at the model's size."""
    return np.stack([load_image(p, cap.image_size, crop_margin=margin) for p in paths])


def beam_candidates(cap: Captioner, pixels: np.ndarray, beam: int) -> list[list[str]]:
    """Each picture's beam candidates (texts), best first, valid SMILES first."""
    gen = cap.generate(pixels, strategy="beam", beam_size=beam, n_best=beam, rescore_views=[])
    return [[c.text for c in row] for row in gen.candidates]


def teacher_forced(cap: Captioner, pixels: np.ndarray, texts: list[list[str]]) -> np.ndarray:
    """(B, N) log-probability of each picture's texts read in ``pixels`` (0 past a row's end)."""
    rows = [[cap.tokenizer.encode(text)[1:] for text in row] for row in texts]  # <end> kept
    out = np.zeros((len(rows), max(map(len, rows))), np.float32)  # (B, N)
    for s in range(0, len(rows), 64):
        part = cap.read_tokens(pixels[s:s + 64], rows[s:s + 64])["token_scores"].sum(2)
        out[s:s + 64, :part.shape[1]] = part
    return out


def first_valid(texts: list[str]) -> str | None:
    return next((c for c in map(canonical_smiles, texts) if c), None)


def exact(picks: list[str | None], molecules: list[str]) -> float:
    return float(np.mean([p is not None and p == m for p, m in zip(picks, molecules)]))


def vote(firsts: dict[float, list[str | None]], own: float) -> list[str | None]:
    picks = []
    for i, mine in enumerate(firsts[own]):
        counts = Counter(f[i] for f in firsts.values() if f[i])
        picks.append(max(counts, key=lambda c: (counts[c], c == mine)) if counts else None)
    return picks


def union_pick(union: list[list[str]], scores: np.ndarray) -> list[str | None]:
    """The molecule whose spellings' summed probability (scores: (B, N) log) is highest:
    ``decode.margin_views``'s rule (``pool_readings``), for any set of margins' sums."""
    picks = []
    for row, logp in zip(union, scores):
        ranked = [r for r in pool_readings([canonical_smiles(t) or "" for t in row],
                                           logp[:len(row), None]) if r.key]
        picks.append(ranked[0].key if ranked else None)
    return picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--beam-size", type=int, default=5)
    ap.add_argument("--margins", default="0.05,0.1,0.15,0.2,0.25")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cap = Captioner.load(args.run)
    own = cap.crop_margin
    margins = sorted({float(m) for m in args.margins.split(",")} | {own})
    paths, molecules = pictures_and_molecules(args.eval_dir, args.limit)
    pixels = {m: read_at(cap, paths, m) for m in margins}
    beams = {m: beam_candidates(cap, pixels[m], args.beam_size) for m in margins}
    out = {"run": args.run, "pictures": len(paths), "margins": margins}
    firsts = {m: [first_valid(b) for b in beams[m]] for m in margins}
    for m in margins:
        out[f"top1@{m}"] = exact(firsts[m], molecules)
        out[f"top{args.beam_size}@{m}"] = float(np.mean(
            [mol in set(map(canonical_smiles, b)) for b, mol in zip(beams[m], molecules)]))
    out["vote"] = exact(vote(firsts, own), molecules)
    union = [list(dict.fromkeys(t for m in margins for t in beams[m][i] if canonical_smiles(t)))
             for i in range(len(paths))]
    scored = {m: teacher_forced(cap, pixels[m], union) for m in margins}
    near = sorted(margins, key=lambda m: abs(m - own))[:3]
    for name, subset in (("own", [own]), ("three", near), ("all", margins)):
        out[f"union-{name}"] = exact(union_pick(union, sum(scored[m] for m in subset)), molecules)
    out["union_has_molecule"] = float(np.mean(
        [mol in set(map(canonical_smiles, u)) for u, mol in zip(union, molecules)]))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
