"""Metrics on decoded texts: captions (BLEU, CIDEr-D, ROUGE-L, METEOR) and SMILES (RDKit).

Caption functions take ``predictions`` (one text per image) and ``references`` (a list of
reference texts per image) and compare texts as token lists from a ``split`` function.

* BLEU is NLTK's (``corpus_bleu``; brevity penalty from the *closest* reference length,
  per-example BLEU-4 with ``SmoothingFunction().method1``). pycocoevalcap's ``Bleu`` is a
  different implementation (its own ``BleuScorer`` with ``option="closest"`` and a tiny
  1e-9/1e-15 smoothing). Same BLEU-1/2 on ordinary corpora, but NLTK counts a denominator
  of at least 1 per sentence and n-gram order, so texts shorter than n words lower NLTK's
  BLEU-n (e.g. 0.688 vs 0.719 BLEU-4 in ``tests/test_metrics.py``). We keep NLTK's.
* CIDEr-D and ROUGE-L follow pycocoevalcap's ``cider_scorer.py`` and ``rouge.py`` line by
  line (see :func:`cider_d_per_image` and :func:`sentence_rouge_l`), on our ``split`` tokens
  instead of the PTB tokenizer output.
* METEOR runs pycocoevalcap's ``meteor-1.5.jar`` with Java when both are present
  (:func:`meteor_scores`); otherwise :func:`caption_metrics` reports ``meteor: None`` and a
  ``meteor_unavailable`` reason, never a made-up number.

SMILES functions (:func:`smiles_metrics`) need RDKit, imported lazily.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.choices import Choices
from captioner.data.chem import canonical_smiles, chem, parse, quiet_rdkit

Splitter = Callable[[str], list[str]]
NGram = tuple[str, ...]


def exact_match(predictions: list[str], references: list[list[str]],
                split: Splitter = str.split) -> float:
    """Share of predictions equal (as token lists) to at least one of their references.
    A prediction ``split`` rejects with ``ValueError`` (a model's SMILES holding
    ``<unk>``, which the SMILES regex cannot split) matches none.

    Example:
        >>> exact_match(["a b", "c"], [["a  b"], ["d", "e"]])
        0.5
    """
    _check(predictions, references)
    if not predictions:
        return 0.0
    hits = 0
    for prediction, refs in zip(predictions, references):
        tokens = _split_prediction(prediction, split)
        hits += tokens is not None and tokens in [split(r) for r in refs]
    return hits / len(predictions)


def _split_prediction(prediction: str, split: Splitter) -> list[str] | None:
    """``split(prediction)``, or None when ``split`` rejects it with ``ValueError`` (not a
    text of the references' kind, e.g. a SMILES holding ``<unk>``)."""
    try:
        return split(prediction)
    except ValueError:
        return None


def corpus_bleu(predictions: list[str], references: list[list[str]], n: int = 4,
                split: Splitter = str.split) -> float:
    """Corpus BLEU-n (uniform weights, no smoothing) with NLTK, against all references.
    A prediction ``split`` rejects counts as an empty hypothesis (no n-gram matches; the
    brevity penalty sees its length as 0).

    Example:
        >>> round(corpus_bleu(["a red circle above a blue square"],
        ...                   [["a red circle above a blue square"]]), 3)
        1.0
    """
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

    _check(predictions, references)
    if not predictions:
        return 0.0
    weights = tuple([1.0 / n] * n)
    refs = [[split(r) for r in rs] for rs in references]
    hyps = [_split_prediction(p, split) or [] for p in predictions]
    return float(nltk_corpus_bleu(refs, hyps, weights=weights))


def _check(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")


def _check_nonempty_refs(references: list[list[str]]) -> None:
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"image {i} has no reference texts")


def validation_metric(name: str, predictions: list[str], references: list[list[str]],
                      split: Splitter = str.split) -> float:
    """The per-epoch validation metric used for ``best`` checkpoints (higher is better)."""
    if name == "exact_match":
        return exact_match(predictions, references, split)
    if name == "bleu4":
        return corpus_bleu(predictions, references, 4, split)
    raise ValueError(f"unknown validation metric {name!r} (exact_match or bleu4)")


# --------------------------------------------------------------------------- sentence BLEU


def sentence_bleu4(prediction: list[str], references: list[list[str]]) -> float:
    """NLTK sentence BLEU-4 (uniform weights, ``SmoothingFunction().method1``) on tokens.

    Example:
        >>> round(sentence_bleu4("the cat sat down".split(), ["the cat is down".split()]), 4)
        0.188
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = SmoothingFunction().method1
    return float(sentence_bleu(references, prediction, smoothing_function=smoothing))


# --------------------------------------------------------------------------------- CIDEr-D


@dataclass(frozen=True)
class _TfIdf:
    """tf-idf vectors of one text, one dict per n-gram order (``counts2vec`` in pycocoevalcap)."""

    vec: tuple[dict[NGram, float], ...]
    norm: tuple[float, ...]
    length: int  # number of *bigrams*: pycocoevalcap counts ``length`` only at 0-based n == 1


def _ngram_counts(tokens: list[str], n: int) -> Counter[NGram]:
    """Counts of all 1..n-grams, in pycocoevalcap ``precook`` order."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1)
                   for i in range(len(tokens) - k + 1))


def _document_frequency(ref_counts: list[list[Counter[NGram]]]) -> Counter[NGram]:
    """Number of images whose references contain each n-gram."""
    df: Counter[NGram] = Counter()
    for refs in ref_counts:
        df.update({gram for counts in refs for gram in counts})
    return df


def _tfidf(counts: Counter[NGram], df: Counter[NGram], log_images: float, n: int) -> _TfIdf:
    vec: list[dict[NGram, float]] = [{} for _ in range(n)]
    squares = [0.0] * n
    for gram, tf in counts.items():
        order = len(gram) - 1
        weight = float(tf) * (log_images - math.log(max(1.0, float(df[gram]))))
        vec[order][gram] = weight
        squares[order] += weight ** 2
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return _TfIdf(tuple(vec), tuple(math.sqrt(s) for s in squares), length)


def _cider_sim(hyp: _TfIdf, ref: _TfIdf, sigma: float) -> list[float]:
    """Clipped cosine similarity per n-gram order times the Gaussian length penalty."""
    delta = float(hyp.length - ref.length)
    penalty = math.e ** (-(delta ** 2) / (2 * sigma ** 2))
    values = []
    for h_vec, r_vec, h_norm, r_norm in zip(hyp.vec, ref.vec, hyp.norm, ref.norm):
        val = 0.0
        for gram, weight in h_vec.items():
            r_weight = r_vec.get(gram, 0.0)
            val += min(weight, r_weight) * r_weight
        if h_norm != 0 and r_norm != 0:
            val /= h_norm * r_norm
        values.append(val * penalty)
    return values


def cider_d_per_image(predictions: list[str], references: list[list[str]],
                      split: Splitter = str.split, n: int = 4, sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each image, as pycocoevalcap's ``CiderScorer`` (its ``Cider`` is CIDEr-D).

    Document frequencies come from the references of *this* corpus (idf = log(#images) -
    log(max(1, df))), so a one-image corpus scores 0. Per reference: clipped tf-idf cosine
    per n-gram order (n = 1..4), times exp(-delta^2 / (2 sigma^2)) where delta is the
    difference in *bigram* counts (as pycocoevalcap; equal to the word-length difference
    whenever neither text is empty); mean over orders, mean over references, times 10.

    Example:
        >>> cider_d_per_image(["a b c d", "x y z"], [["a b c d"], ["x y z"]])
        [10.0, 7.5]
    """
    _check(predictions, references)
    _check_nonempty_refs(references)
    if not predictions:
        return []
    ref_counts = [[_ngram_counts(split(r), n) for r in refs] for refs in references]
    df = _document_frequency(ref_counts)
    log_images = math.log(float(len(ref_counts)))
    scores = []
    for pred, refs in zip(predictions, ref_counts):
        hyp = _tfidf(_ngram_counts(split(pred), n), df, log_images, n)
        per_order = [0.0] * n
        for counts in refs:
            sims = _cider_sim(hyp, _tfidf(counts, df, log_images, n), sigma)
            per_order = [a + b for a, b in zip(per_order, sims)]
        scores.append(sum(per_order) / n / len(refs) * 10.0)
    return scores


def cider_d(predictions: list[str], references: list[list[str]],
            split: Splitter = str.split) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_d_per_image` (0.0 for an empty corpus).

    Example:
        >>> cider_d(["a b c d", "x y z"], [["a b c d"], ["x y z"]])
        8.75
    """
    scores = cider_d_per_image(predictions, references, split)
    return sum(scores) / len(scores) if scores else 0.0


# --------------------------------------------------------------------------------- ROUGE-L


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def sentence_rouge_l(prediction: list[str], references: list[list[str]],
                     beta: float = 1.2) -> float:
    """ROUGE-L of one tokenised text as pycocoevalcap's ``Rouge.calc_score``.

    Precision and recall are each maxed over the references *separately*, then combined
    as F = (1 + beta^2) P R / (R + beta^2 P). Empty token lists get precision (or recall)
    0 where pycocoevalcap would see the one token ``''`` of ``"".split(" ")``.

    Example:
        >>> round(sentence_rouge_l("a b c d".split(), ["a c d e f".split()]), 6)
        0.653571
    """
    if not references:
        raise ValueError("ROUGE-L needs at least one reference")
    lcs = [_lcs_length(ref, prediction) for ref in references]
    prec = max(m / len(prediction) if prediction else 0.0 for m in lcs)
    rec = max(m / len(ref) if ref else 0.0 for m, ref in zip(lcs, references))
    if prec == 0 or rec == 0:
        return 0.0
    return ((1 + beta ** 2) * prec * rec) / float(rec + beta ** 2 * prec)


def rouge_l_per_image(predictions: list[str], references: list[list[str]],
                      split: Splitter = str.split) -> list[float]:
    """:func:`sentence_rouge_l` of each image.

    Example:
        >>> rouge_l_per_image(["a b", "c"], [["a b"], ["d"]])
        [1.0, 0.0]
    """
    _check(predictions, references)
    _check_nonempty_refs(references)
    return [sentence_rouge_l(split(p), [split(r) for r in refs])
            for p, refs in zip(predictions, references)]


def rouge_l(predictions: list[str], references: list[list[str]],
            split: Splitter = str.split) -> float:
    """Corpus ROUGE-L: the mean over images, as pycocoevalcap (0.0 for an empty corpus).

    Example:
        >>> rouge_l(["a b", "c"], [["a b"], ["d"]])
        0.5
    """
    scores = rouge_l_per_image(predictions, references, split)
    return sum(scores) / len(scores) if scores else 0.0


# ---------------------------------------------------------------------------------- METEOR


class MeteorUnavailable(RuntimeError):
    """METEOR cannot run here (no pycocoevalcap jar, no Java, or the jar failed)."""


def _meteor_jar() -> Path:
    try:
        import pycocoevalcap.meteor.meteor as meteor_module
    except ImportError as exc:
        raise MeteorUnavailable("pycocoevalcap is not installed (pip install pycocoevalcap)"
                                ) from exc
    jar = Path(meteor_module.__file__).resolve().parent / "meteor-1.5.jar"
    if not jar.is_file():
        raise MeteorUnavailable(f"METEOR jar not found at {jar}")
    return jar


def _meteor_session(proc: subprocess.Popen, hyps: list[str],
                    refs: list[list[str]]) -> tuple[float, list[float]]:
    """pycocoevalcap's stdio protocol: one SCORE line per image, then one EVAL line."""
    assert proc.stdin is not None and proc.stdout is not None
    stats = []
    for hyp, rs in zip(hyps, refs):
        proc.stdin.write(" ||| ".join(("SCORE", " ||| ".join(rs), hyp)) + "\n")
        proc.stdin.flush()
        stats.append(proc.stdout.readline().strip())
    proc.stdin.write("EVAL ||| " + " ||| ".join(stats) + "\n")
    proc.stdin.flush()
    per_image = [float(proc.stdout.readline().strip()) for _ in stats]
    return float(proc.stdout.readline().strip()), per_image


def meteor_scores(predictions: list[str], references: list[list[str]],
                  split: Splitter = str.split, timeout: float = 600.0
                  ) -> tuple[float, list[float]]:
    """Corpus and per-image METEOR 1.5 with pycocoevalcap's jar (needs Java; ~10 s start-up).

    Runs ``java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm`` like
    ``pycocoevalcap.meteor.Meteor``, on texts re-joined from ``split`` tokens. The corpus
    value aggregates statistics and is not the mean of the per-image values. Raises
    :class:`MeteorUnavailable` with the reason when it cannot run.

    Example:
        >>> meteor_scores(["a red circle above a square"],  # doctest: +SKIP
        ...               [["a red circle above a blue square", "a red circle"]])
        (0.45..., [0.45...])
    """
    _check(predictions, references)
    _check_nonempty_refs(references)
    if not predictions:
        raise MeteorUnavailable("no predictions")
    java = shutil.which("java")
    if java is None:
        raise MeteorUnavailable("java not found on PATH (METEOR 1.5 is a Java program)")
    jar = _meteor_jar()
    hyps = [" ".join(split(p)).replace("|||", "") for p in predictions]
    refs = [[" ".join(split(r)).replace("|||", "") for r in rs] for rs in references]
    cmd = [java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(cmd, cwd=jar.parent, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            return _meteor_session(proc, hyps, refs)
        except (OSError, ValueError) as exc:
            stderr.seek(0)
            tail = stderr.read()[-500:].strip()
            raise MeteorUnavailable(f"METEOR jar failed ({exc}); stderr: {tail}") from exc
        finally:
            watchdog.cancel()
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------ caption summaries


def caption_metrics(predictions: list[str], references: list[list[str]],
                    split: Splitter = str.split, meteor: bool = True) -> dict[str, Any]:
    """Corpus caption metrics: exact match, BLEU-1..4 (NLTK), CIDEr-D, ROUGE-L, METEOR.

    ``meteor`` is ``None`` plus a ``meteor_unavailable`` reason when pycocoevalcap or Java
    is missing (or ``meteor=False``).

    Example:
        >>> m = caption_metrics(["a b c d", "x y z"], [["a b c d"], ["x y z"]], meteor=False)
        >>> m["bleu1"], m["cider_d"], m["rouge_l"], m["meteor"], m["meteor_unavailable"]
        (1.0, 8.75, 1.0, None, 'disabled (meteor=False)')
    """
    _check(predictions, references)
    _check_nonempty_refs(references)
    result: dict[str, Any] = {"family": "caption", "count": len(predictions),
                              "exact_match": exact_match(predictions, references, split)}
    for n in range(1, 5):
        result[f"bleu{n}"] = corpus_bleu(predictions, references, n, split)
    result["cider_d"] = cider_d(predictions, references, split)
    result["rouge_l"] = rouge_l(predictions, references, split)
    result["meteor"] = None
    if not meteor:
        result["meteor_unavailable"] = "disabled (meteor=False)"
        return result
    try:
        result["meteor"] = meteor_scores(predictions, references, split)[0]
    except MeteorUnavailable as exc:
        result["meteor_unavailable"] = str(exc)
    return result


def per_example_caption_metrics(predictions: list[str], references: list[list[str]],
                                split: Splitter = str.split) -> list[dict[str, Any]]:
    """Per-image exact match, sentence BLEU-4 (method1 smoothing), CIDEr-D and ROUGE-L.

    CIDEr-D per image still uses document frequencies of the whole corpus passed in.

    Example:
        >>> rows = per_example_caption_metrics(["a b c d", "x y"], [["a b c d"], ["x z"]])
        >>> [(r["exact_match"], round(r["bleu4"], 4), round(r["cider_d"], 4), r["rouge_l"])
        ...  for r in rows]
        [(True, 1.0, 10.0, 1.0), (False, 0.1495, 1.25, 0.5)]
    """
    ciders = cider_d_per_image(predictions, references, split)
    rows = []
    for pred, refs, cider in zip(predictions, references, ciders):
        hyp, ref_tokens = split(pred), [split(r) for r in refs]
        rows.append({"exact_match": hyp in ref_tokens,
                     "bleu4": sentence_bleu4(hyp, ref_tokens) if hyp else 0.0,
                     "cider_d": cider,
                     "rouge_l": sentence_rouge_l(hyp, ref_tokens)})
    return rows


# ------------------------------------------------------------------------------------ SMILES



def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each).

    Example:
        >>> levenshtein("kitten", "sitting")
        3
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def normalized_levenshtein(a: str, b: str) -> float:
    """``levenshtein(a, b) / max(len(a), len(b))``; 0.0 for two empty strings.

    Example:
        >>> normalized_levenshtein("CCO", "CCN"), normalized_levenshtein("", "")
        (0.3333333333333333, 0.0)
    """
    longest = max(len(a), len(b))
    return levenshtein(a, b) / longest if longest else 0.0


def heavy_atom_bins() -> tuple[str, ...]:
    """Labels of the heavy-atom bins, in order (``"unknown"`` is used only when needed).

    Example:
        >>> heavy_atom_bins()
        ('1-10', '11-20', '21-30', '31+')
    """
    return ("1-10", "11-20", "21-30", "31+")


def heavy_atom_bin(heavy_atoms: int | None) -> str:
    """Bin label of a heavy-atom count (0, e.g. ``[H][H]``, goes to ``"1-10"``).

    Example:
        >>> heavy_atom_bin(10), heavy_atom_bin(11), heavy_atom_bin(31), heavy_atom_bin(None)
        ('1-10', '11-20', '31+', 'unknown')
    """
    if heavy_atoms is None:
        return "unknown"
    for upper, label in zip((10, 20, 30), heavy_atom_bins()):
        if heavy_atoms <= upper:
            return label
    return heavy_atom_bins()[-1]


@dataclass(frozen=True)
class _Molecule:
    """A parsed SMILES with everything the metrics compare (fields None when invalid)."""

    smiles: str
    mol: Any
    canonical: str | None
    canonical_flat: str | None
    inchi: str | None
    fingerprint: Any


def _describe(smiles: str, generator: Any) -> _Molecule:
    rd = chem()
    mol = parse(smiles)
    if mol is None:
        return _Molecule(smiles, None, None, None, None, None)
    inchi = rd.MolToInchi(mol) or None
    flat = rd.MolToSmiles(mol, isomericSmiles=False)
    return _Molecule(smiles, mol, rd.MolToSmiles(mol), flat, inchi,
                     generator.GetFingerprint(mol))


def _smiles_error(pred: _Molecule, ref: _Molecule) -> str:
    """How ``pred`` differs from ``ref``, one of ``Choices().smiles_error``: ``none`` (the
    same canonical SMILES), ``invalid`` (a side did not parse), ``stereo`` (right but for
    stereo), ``isomer`` (the same molecular formula, other bonds), ``atoms`` (as many heavy
    atoms, another formula: an element or hydrogens misread), ``size`` (another number of
    heavy atoms)."""
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    if pred.mol is None or ref.mol is None:
        return "invalid"
    if pred.canonical == ref.canonical:
        return "none"
    if pred.canonical_flat == ref.canonical_flat:
        return "stereo"
    if CalcMolFormula(pred.mol) == CalcMolFormula(ref.mol):
        return "isomer"
    return "atoms" if pred.mol.GetNumHeavyAtoms() == ref.mol.GetNumHeavyAtoms() else "size"


def _smiles_example(pred: _Molecule, ref: _Molecule, heavy_atoms: int | None) -> dict[str, Any]:
    from rdkit import DataStructs

    both = pred.mol is not None and ref.mol is not None
    if heavy_atoms is None and ref.mol is not None:
        heavy_atoms = ref.mol.GetNumHeavyAtoms()
    tanimoto = DataStructs.TanimotoSimilarity(pred.fingerprint, ref.fingerprint) if both else 0.0
    return {
        "prediction": pred.smiles, "reference": ref.smiles,
        "canonical_prediction": pred.canonical, "canonical_reference": ref.canonical,
        "valid": pred.mol is not None,
        "valid_reference": ref.mol is not None,
        "exact_match": both and pred.canonical == ref.canonical,
        "exact_match_nostereo": both and pred.canonical_flat == ref.canonical_flat,
        "inchi_match": both and pred.inchi is not None and pred.inchi == ref.inchi,
        "tanimoto": float(tanimoto),
        "levenshtein": normalized_levenshtein(pred.canonical or pred.smiles,
                                              ref.canonical or ref.smiles),
        "heavy_atoms": heavy_atoms,
        "heavy_atom_bin": heavy_atom_bin(heavy_atoms),
        "error_kind": _smiles_error(pred, ref),
    }


def _first_references(references: Sequence[str] | Sequence[Sequence[str]]) -> list[str]:
    """One reference SMILES per image: the string itself, or the first of a list."""
    out = []
    for i, ref in enumerate(references):
        if isinstance(ref, str):
            out.append(ref)
        elif ref:
            out.append(ref[0])
        else:
            raise ValueError(f"image {i} has no reference SMILES")
    return out


def per_example_smiles_metrics(predictions: list[str],
                               references: list[str] | list[list[str]],
                               heavy_atoms: list[int] | None = None) -> list[dict[str, Any]]:
    """Per-molecule validity, exact/no-stereo/InChI matches, Tanimoto, Levenshtein, bin.

    A reference given as a list uses its first SMILES (alternative spellings of the same
    molecule are unified by canonicalisation anyway). Tanimoto uses Morgan fingerprints
    (radius 2, 2048 bits) and is 0 for an invalid prediction; the normalised Levenshtein
    distance compares canonical SMILES (the raw string when a side does not parse).
    ``heavy_atoms`` overrides the counts RDKit computes from the references.

    Example:
        >>> row = per_example_smiles_metrics(["OCC"], ["CCO"])[0]
        >>> row["valid"], row["exact_match"], row["tanimoto"], row["heavy_atom_bin"]
        (True, True, 1.0, '1-10')
    """
    from rdkit.Chem import rdFingerprintGenerator

    refs = _first_references(references)
    _check(predictions, refs)
    if heavy_atoms is not None and len(heavy_atoms) != len(refs):
        raise ValueError(f"{len(heavy_atoms)} heavy-atom counts but {len(refs)} references")
    counts: list[int | None] = list(heavy_atoms) if heavy_atoms is not None else [None] * len(refs)
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    with quiet_rdkit():
        return [_smiles_example(_describe(p, generator), _describe(r, generator), h)
                for p, r, h in zip(predictions, refs, counts)]


def exact_match_at_k(candidates: Sequence[Sequence[str]],
                     references: list[str] | list[list[str]]) -> float | None:
    """Share of images one of whose candidate SMILES is the reference molecule (canonical
    SMILES with stereo, as ``exact_match``): top-k exact match, k the candidates given per
    image (e.g. a beam's ``n_best``). None for no images.

    Example:
        >>> exact_match_at_k([["CCC", "OCC"], ["CCN", "C1CC"]], ["CCO", "CCO"])
        0.5
    """
    refs = _first_references(references)
    _check(candidates, refs)
    hits = [(target := canonical_smiles(ref)) is not None
            and any(canonical_smiles(c) == target for c in cands)
            for cands, ref in zip(candidates, refs)]
    return _mean([float(h) for h in hits])


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summarise_smiles(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates and means over per-example rows (None for an empty group)."""
    return {
        "count": len(rows),
        "validity": _mean([float(r["valid"]) for r in rows]),
        "exact_match": _mean([float(r["exact_match"]) for r in rows]),
        "exact_match_nostereo": _mean([float(r["exact_match_nostereo"]) for r in rows]),
        "inchi_match": _mean([float(r["inchi_match"]) for r in rows]),
        "tanimoto": _mean([r["tanimoto"] for r in rows]),
        "tanimoto_1": _mean([float(r["tanimoto"] == 1.0) for r in rows]),
        "levenshtein": _mean([r["levenshtein"] for r in rows]),
        "error_kinds": {kind: _mean([float(r["error_kind"] == kind) for r in rows])
                        for kind in Choices().smiles_error} if rows else None,
    }


def smiles_metrics(predictions: list[str], references: list[str] | list[list[str]],
                   heavy_atoms: list[int] | None = None) -> dict[str, Any]:
    """Corpus SMILES metrics and their breakdown by heavy atoms of the reference.

    Keys: ``count``, ``validity``, ``exact_match`` (canonical, with stereo),
    ``exact_match_nostereo``, ``inchi_match``, ``tanimoto`` (mean), ``tanimoto_1`` (share
    with Tanimoto 1.0), ``levenshtein`` (mean normalised distance, lower is better),
    ``error_kinds`` (the share of each kind of difference, ``Choices().smiles_error``:
    none, invalid, stereo, isomer, atoms, size; each example's is its ``error_kind``),
    ``invalid_references`` and ``by_heavy_atoms`` (bin -> the same keys; an ``"unknown"`` bin
    appears only for unparseable references without a given count). Empty groups get None.

    Example:
        >>> m = smiles_metrics(["OCC", "C1CC"], ["CCO", "CCC"])
        >>> m["validity"], m["exact_match"], m["tanimoto"], m["by_heavy_atoms"]["1-10"]["count"]
        (0.5, 0.5, 0.5, 2)
    """
    return smiles_summary(per_example_smiles_metrics(predictions, references, heavy_atoms))


def smiles_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`smiles_metrics` of rows :func:`per_example_smiles_metrics` already computed
    (so a caller that also writes the rows scores each molecule once).

    Example:
        >>> rows = per_example_smiles_metrics(["OCC", "C1CC"], ["CCO", "CCC"])
        >>> smiles_summary(rows) == smiles_metrics(["OCC", "C1CC"], ["CCO", "CCC"])
        True
    """
    labels = list(heavy_atom_bins())
    if any(r["heavy_atom_bin"] == "unknown" for r in rows):
        labels.append("unknown")
    by_bin = {label: _summarise_smiles([r for r in rows if r["heavy_atom_bin"] == label])
              for label in labels}
    return {"family": "smiles", **_summarise_smiles(rows),
            "invalid_references": sum(not r["valid_reference"] for r in rows),
            "by_heavy_atoms": by_bin}


# ------------------------------------------------------------------------------ dispatching


def metric_family(tokenizer_kind: str) -> str:
    """``"caption"`` for word tokenizers, ``"smiles"`` for smiles/char/selfies tokenizers
    (a SELFIES tokenizer decodes to SMILES).

    Example:
        >>> metric_family("word"), metric_family("char"), metric_family("selfies")
        ('caption', 'smiles', 'smiles')
    """
    families = {"word": "caption", "smiles": "smiles", "char": "smiles", "selfies": "smiles"}
    if tokenizer_kind not in families:
        raise ValueError(f"unknown tokenizer kind {tokenizer_kind!r} "
                         f"({', '.join(families)})")
    return families[tokenizer_kind]


def compute_metrics(family: str, predictions: list[str], references: list[Any],
                    **kwargs: Any) -> dict[str, Any]:
    """:func:`caption_metrics` or :func:`smiles_metrics`, chosen by ``family``.

    Example:
        >>> compute_metrics("smiles", ["CCO"], [["OCC"]])["exact_match"]
        1.0
    """
    if family == "caption":
        return caption_metrics(predictions, references, **kwargs)
    if family == "smiles":
        return smiles_metrics(predictions, references, **kwargs)
    raise ValueError(f"unknown metric family {family!r} (caption or smiles)")


# -------------------------------------------------------------------------------- rendering


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _headline_names(family: str) -> tuple[tuple[str, str], ...]:
    if family == "smiles":
        return (("count", "Molecules"), ("validity", "Validity"),
                ("exact_match", "Exact match (canonical)"),
                ("exact_match_nostereo", "Exact match (no stereo)"),
                ("inchi_match", "InChI match"), ("tanimoto", "Tanimoto (Morgan r2, 2048)"),
                ("tanimoto_1", "Tanimoto = 1"), ("levenshtein", "Norm. Levenshtein (lower)"),
                ("invalid_references", "Invalid references"))
    return (("count", "Images"), ("exact_match", "Exact match"), ("bleu1", "BLEU-1"),
            ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"), ("bleu4", "BLEU-4"),
            ("cider_d", "CIDEr-D"), ("rouge_l", "ROUGE-L"), ("meteor", "METEOR"))


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """Markdown table of the headline numbers (plus the heavy-atom table for SMILES).

    Example:
        >>> print(metrics_markdown({"family": "caption", "bleu4": 0.25, "meteor": None,
        ...                         "meteor_unavailable": "java not found"}))
        | Metric | Value |
        |---|---:|
        | BLEU-4 | 0.2500 |
        | METEOR | n/a (java not found) |
    """
    family = metrics.get("family") or ("smiles" if "validity" in metrics else "caption")
    rows = []
    for key, name in _headline_names(family):
        if key in metrics:
            value = _fmt(metrics[key])
            if key == "meteor" and metrics[key] is None and metrics.get("meteor_unavailable"):
                value += f" ({metrics['meteor_unavailable']})"
            rows.append([name, value])
    if metrics.get("exact_match_at_k") is not None:
        rows.append([f"Exact match in the {metrics['top_k']} candidates kept (top-k)",
                     _fmt(metrics["exact_match_at_k"])])
    lines = _table(["Metric", "Value"], rows)
    errors = metrics.get("error_kinds")
    if errors:
        kinds = [k for k in errors if k != "none"]
        lines += ["", "How the molecules read wrong differ from their reference (share of all "
                  "images; `error_kind` in predictions.csv):", "",
                  *_table(kinds, [[_fmt(errors[k]) for k in kinds]])]
    bins = metrics.get("by_heavy_atoms")
    if bins:
        keys = [k for k, _ in _headline_names("smiles")[:-1]]
        header = ["Heavy atoms"] + [name for _, name in _headline_names("smiles")[:-1]]
        bin_rows = [[label] + [_fmt(group.get(k)) for k in keys] for label, group in bins.items()]
        lines += ["", "By heavy-atom count of the reference:", ""] + _table(header, bin_rows)
    if metrics.get("compare"):
        lines += ["", "Side by side with other readers on the same images:", "",
                  comparison_markdown(metrics, metrics["compare"])]
    return "\n".join(lines)


def comparison_markdown(ours: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of our SMILES metrics beside other readers' (one column each, named
    by its ``name`` or its key): the headline matches, validity, Tanimoto, exact match by
    heavy-atom bin (bins holding molecules) and images per second (wall time).

    Example:
        >>> ours = {"exact_match": 0.75, "validity": 1.0, "images_per_s": 50.0,
        ...         "by_heavy_atoms": {"1-10": {"count": 4, "exact_match": 0.75},
        ...                            "11-20": {"count": 0, "exact_match": None}}}
        >>> osra = {"name": "OSRA", "exact_match": 0.25, "validity": 0.5, "images_per_s": 8.0,
        ...         "by_heavy_atoms": {"1-10": {"count": 4, "exact_match": 0.25}}}
        >>> print(comparison_markdown(ours, {"osra": osra}))
        | Metric | ours | OSRA |
        |---|---:|---:|
        | Exact match (canonical) | 0.7500 | 0.2500 |
        | Validity | 1.0000 | 0.5000 |
        | Exact match, 1-10 heavy atoms (4) | 0.7500 | 0.2500 |
        | Images per second (wall) | 50.0000 | 8.0000 |
    """
    columns = [ours, *others.values()]
    header = ["Metric", "ours", *[str(m.get("name", key)) for key, m in others.items()]]
    rows = []
    for key in ("exact_match", "exact_match_nostereo", "inchi_match", "validity", "tanimoto",
                "tanimoto_1"):
        if any(key in m for m in columns):
            rows.append([dict(_headline_names("smiles"))[key],
                         *[_fmt(m.get(key)) for m in columns]])
    for label, group in (ours.get("by_heavy_atoms") or {}).items():
        if group.get("count"):
            rows.append([f"Exact match, {label} heavy atoms ({group['count']})",
                         *[_fmt((m.get("by_heavy_atoms") or {}).get(label, {}).get("exact_match"))
                           for m in columns]])
    if any("images_per_s" in m for m in columns):
        rows.append(["Images per second (wall)", *[_fmt(m.get("images_per_s")) for m in columns]])
    return "\n".join(_table(header, rows))
