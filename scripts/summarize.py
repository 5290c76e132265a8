"""Print the README's results tables from what the recipes in scripts/ wrote.

    python scripts/summarize.py demo float32=runs/demo mixed_bfloat16=runs/demo_mixed_bfloat16
    python scripts/summarize.py smiles greedy=runs/qm9/eval-greedy "beam 5=runs/qm9/eval-beam5"
    python scripts/summarize.py sizes greedy=runs/qm9/eval-rdkit_default
    python scripts/summarize.py errors greedy=runs/qm9/eval-rdkit_default
    python scripts/summarize.py curve qm9=runs/qm9
    python scripts/summarize.py captions greedy=runs/flickr8k/eval-greedy
    python scripts/summarize.py bench ours_float32=runs/bench/ours_float32.json ...
    python scripts/summarize.py steps mirrored=runs/bench/qm9_mirrored_32_1.json ...

Each argument is ``LABEL=PATH``: a run or evaluation folder holding ``metrics.json``, or a
``bench`` JSON line. Standard library only; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def load(path: Path) -> dict[str, Any]:
    """``metrics.json`` of a folder, or a JSON file (the last non-empty line: ``bench``);
    ``_path`` holds the folder. A run folder (``history.json``, no metrics) gives only ``_path``."""
    run_only = not (path / "metrics.json").is_file() and (path / "history.json").is_file()
    if path.is_dir() and run_only:
        return {"_path": str(path)}
    return {**_load(path), "_path": str(path)}


def _load(path: Path) -> dict[str, Any]:
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"summarize: no results at {file}")
    text = file.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # anything printed before the JSON line
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise SystemExit(f"summarize: {file} is empty (did the run fail?)") from None
        return json.loads(lines[-1])


def num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def demo(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for label, m in results.items():
        n = m.get("images", 0)
        d = m.get("grounding_detail", {})
        rows.append([label, f"{num(m.get('exact_match'))} ({round(m['exact_match'] * n)} / {n})",
                     f"{num(m.get('grounding'))} ({d.get('grounded')} of "
                     f"{d.get('object_words')} words)", f"{m.get('train_seconds', 'n/a')} s"])
    return table(["run", "exact caption match", "attention grounding", "training time"], rows)


def smiles(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for label, m in results.items():
        rows.append([label, str(m.get("images", "n/a")), num(m.get("exact_match")),
                     num(m.get("validity")), num(m.get("inchi_match")), num(m.get("tanimoto")),
                     num(m.get("levenshtein"))])
        osra = (m.get("compare") or {}).get("osra")
        if osra:  # OSRA on the same pictures
            rows.append([f"{label}: OSRA", str(osra.get("count", "n/a")),
                         num(osra.get("exact_match")), num(osra.get("validity")),
                         num(osra.get("inchi_match")), num(osra.get("tanimoto")),
                         num(osra.get("levenshtein"))])
    text = table(["drawings, decoding", "images", "exact match", "validity", "InChI match",
                  "mean Tanimoto", "norm. Levenshtein"], rows)
    for label, m in results.items():
        d = m.get("grounding_detail") or {}
        if m.get("grounding") is not None:
            text += (f"\n{label}: atom grounding {num(m['grounding'])}, peak within one cell "
                     f"{num(d.get('within_one_cell'), 2)} ({d.get('molecules')} molecules, "
                     f"{m.get('images')} images)")
    for label, m in results.items():
        if m.get("exact_match_at_k") is not None:
            text += (f"\n{label}: the molecule among the {m['top_k']} candidates "
                     f"{num(m['exact_match_at_k'])} (exact match {num(m.get('exact_match'))})")
    return text


def sizes(results: dict[str, dict[str, Any]]) -> str:
    """Exact match by the reference's heavy atoms, from ``predictions.csv`` beside each
    ``metrics.json`` (the label's PATH must be the evaluation folder)."""
    counts: dict[str, dict[int, list[int]]] = {}
    for label, m in results.items():
        path = Path(m["_path"]) / "predictions.csv"
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("heavy_atoms") not in (None, ""):
                    hit = counts.setdefault(label, {}).setdefault(int(row["heavy_atoms"]), [0, 0])
                    hit[0] += row.get("exact_match") == "True"
                    hit[1] += 1
    atoms = sorted({a for c in counts.values() for a in c})
    rows = [[label, *(f"{c[a][0] / c[a][1]:.3f} ({c[a][1]})" if a in c else "—" for a in atoms)]
            for label, c in counts.items()]
    return table(["exact match (molecules)", *(f"{a} atoms" for a in atoms)], rows)


def errors(results: dict[str, dict[str, Any]]) -> str:
    """How the readings differ from their molecule: the share of each ``error_kinds`` of
    each ``metrics.json`` (OSRA's on a row of its own where it was compared)."""
    rows, kinds = [], []
    for label, m in results.items():
        for name, got in ((label, m), (f"{label}: OSRA", (m.get("compare") or {}).get("osra"))):
            if got and got.get("error_kinds"):
                kinds = kinds or list(got["error_kinds"])
                rows.append([name, *(num(got["error_kinds"].get(k)) for k in kinds)])
    return table(["drawings", *kinds], rows)


def curve(results: dict[str, dict[str, Any]]) -> str:
    """The training curve of a run folder (its ``history.json``)."""
    out = []
    for label, m in results.items():
        h = json.loads((Path(m["_path"]) / "history.json").read_text())
        rows = [[str(e), num(h["loss"][i]), num(h["val_loss"][i]), num(h["val_metric"][i]),
                 f"{h['seconds'][i]:.0f}", num(h["images_per_s"][i], 0)]
                for i, e in enumerate(h["epoch"])]
        total = sum(h["seconds"])
        out.append(f"{label} ({total / 60:.1f} min of training):\n" + table(
            ["epoch", "train loss", "val loss", "val exact", "seconds", "images/s"], rows))
    return "\n\n".join(out)


def captions(results: dict[str, dict[str, Any]]) -> str:
    keys = ("bleu1", "bleu2", "bleu3", "bleu4", "cider_d", "rouge_l", "meteor")
    rows = [[label, *(num(m.get(k)) for k in keys)] for label, m in results.items()]
    text = table(["decoding", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "ROUGE-L",
                  "METEOR"], rows)
    for label, m in results.items():
        if m.get("meteor_unavailable"):
            text += f"\n{label}: METEOR unavailable: {m['meteor_unavailable']}"
    return text


def bench(results: dict[str, dict[str, Any]]) -> str:
    def rate(key: str, digits: int = 0) -> Callable[[dict[str, Any]], str]:
        return lambda r: num(r.get(key), digits)

    fields: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("attention kernel", lambda r: str(r.get("attention_kernel"))),
        ("train images/s", rate("train_images_per_s")),
        ("first step (compile)", lambda r: f"{num(r.get('compile_s'), 1)} s"),
        ("greedy images/s", rate("greedy_images_per_s", 1)),
        ("beam 3 images/s", lambda r: "—" if r.get("beam3_images_per_s") is None
         else num(r["beam3_images_per_s"], 0)),
        ("needed GFLOP/s (peak)", lambda r: f"{num(r.get('train_gflop_per_s'), 0)} "
         f"({num(r.get('peak_gflop_per_s'), 0)})"),
        ("roofline fraction", rate("roofline_fraction", 2)),
        ("peak RSS", lambda r: "n/a" if r.get("peak_rss_mb") is None
         else f"{r['peak_rss_mb'] / 1024:.1f} GB"),
        ("load average at start", rate("load_average", 2)),
    ]
    rows = [[name, *(fn(r) for r in results.values())] for name, fn in fields]
    text = table(["", *results], rows)
    for label, r in results.items():
        e2e = r.get("end_to_end")
        if e2e:
            stages = ", ".join(f"{k} {v:.0f}" for k, v in e2e["stage_images_per_s"].items())
            text += (f"\n{label} end to end (images/s, {e2e['image_size']} px): {stages}; "
                     f"bound by {e2e['bound_by']}, with the feature cache by "
                     f"{e2e['bound_by_cached']}")
    return text


def steps(results: dict[str, dict[str, Any]]) -> str:
    """``bench --config`` lines: a config's train step from pictures, and its drawing."""
    rows = [[label, num(r.get("train_step_ms"), 0), num(r.get("train_images_per_s"), 0),
             num(r.get("drawn_pictures_per_s"), 0), str(r.get("bound_by")),
             num(r.get("load_average"), 2)] for label, r in results.items()]
    return table(["config", "train step (ms)", "step images/s", "drawn pictures/s",
                  "bound by", "load average"], rows)


KINDS = {"demo": demo, "smiles": smiles, "sizes": sizes, "errors": errors, "curve": curve,
         "captions": captions, "bench": bench, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("results", nargs="+", metavar="LABEL=PATH")
    args = parser.parse_args(argv)
    results = {}
    for item in args.results:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = Path(item).name, item
        results[label] = load(Path(path))
    print(KINDS[args.kind](results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
