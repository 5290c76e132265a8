"""Metrics on decoded texts: exact match and corpus BLEU (NLTK).

Every function takes ``predictions`` (one text per image) and ``references`` (a list of
reference texts per image) and compares texts as token lists from a ``split`` function.
"""

from __future__ import annotations

from typing import Callable

Splitter = Callable[[str], list[str]]


def exact_match(predictions: list[str], references: list[list[str]],
                split: Splitter = str.split) -> float:
    """Share of predictions equal (as token lists) to at least one of their references.

    Example:
        >>> exact_match(["a b", "c"], [["a  b"], ["d", "e"]])
        0.5
    """
    _check(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(split(p) in [split(r) for r in refs] for p, refs in zip(predictions, references))
    return hits / len(predictions)


def corpus_bleu(predictions: list[str], references: list[list[str]], n: int = 4,
                split: Splitter = str.split) -> float:
    """Corpus BLEU-n (uniform weights, no smoothing) with NLTK, against all references.

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
    hyps = [split(p) for p in predictions]
    return float(nltk_corpus_bleu(refs, hyps, weights=weights))


def _check(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")


def validation_metric(name: str, predictions: list[str], references: list[list[str]],
                      split: Splitter = str.split) -> float:
    """The per-epoch validation metric used for ``best`` checkpoints (higher is better)."""
    if name == "exact_match":
        return exact_match(predictions, references, split)
    if name == "bleu4":
        return corpus_bleu(predictions, references, 4, split)
    raise ValueError(f"unknown validation metric {name!r} (exact_match or bleu4)")
