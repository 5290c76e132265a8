"""Caption and SMILES metrics against hand-computed and pycocoevalcap reference values."""

from __future__ import annotations

import math
import shutil

import pytest

from captioner.data.chem import canonical_smiles
from captioner.data.tokenizers import SmilesTokenizer
from captioner.evaluate.metrics import (
    MeteorUnavailable,
    caption_metrics,
    cider_d,
    cider_d_per_image,
    compute_metrics,
    corpus_bleu,
    exact_match,
    exact_match_at_k,
    heavy_atom_bin,
    levenshtein,
    meteor_scores,
    metric_family,
    metrics_markdown,
    normalized_levenshtein,
    per_example_caption_metrics,
    per_example_smiles_metrics,
    rouge_l,
    rouge_l_per_image,
    sentence_bleu4,
    sentence_rouge_l,
    smiles_metrics,
    validation_metric,
)

# A small fixed corpus: multiple references, repeated words, a two-word prediction, a
# prediction sharing nothing with its single reference.
PREDS = [
    "a red circle above a blue square",
    "a small green triangle left of a red circle",
    "a dog",
    "the the the cat sat on the mat",
    "two blue squares",
]
REFS = [
    ["a red circle above a blue square", "a red circle is above a blue square",
     "red circle over blue square"],
    ["a green triangle left of a circle", "a small green triangle to the left of a red circle"],
    ["a black dog runs in the park", "a dog running on grass"],
    ["the cat sat on the mat", "a cat is sitting on a mat", "there is a cat on the mat"],
    ["a yellow star below a green circle"],
]
# Computed once with pycocoevalcap 1.2 (Cider, Rouge, Meteor, Bleu(4)) on PREDS / REFS.
COCO_CIDER = [6.109522970097338, 6.0756647684914995, 1.5477088670077626, 3.8139227824437265, 0.0]
COCO_ROUGE = [1.0, 1.0, 0.5304347826086957, 0.8798076923076923, 0.0]
COCO_METEOR = 0.404880585562309
COCO_BLEU = [0.7209589816793289, 0.7234579804408531, 0.7268254167229544, 0.7192326668707938]


def _coco_inputs() -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    return dict(enumerate(REFS)), {i: [p] for i, p in enumerate(PREDS)}


# ------------------------------------------------------------------------------ exact / BLEU


def test_exact_match_uses_any_reference_and_tokens():
    preds = ["a red circle", "a blue  square", "a cat"]
    refs = [["a green circle", "a red circle"], ["a blue square"], ["a dog"]]
    assert exact_match(preds, refs) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0


def test_exact_match_counts_an_unsplittable_prediction_as_a_miss():
    """An undertrained model's SMILES with <unk> once stopped training at validation."""
    split = SmilesTokenizer().tokenize
    with pytest.raises(ValueError):
        split("CC<unk>O")
    assert exact_match(["CC<unk>O", "CCO", "OCC"], [["CCO"], ["CCO"], ["CCO"]],
                       split) == pytest.approx(1 / 3)


def test_exact_match_at_k_is_a_hit_when_any_candidate_is_the_molecule():
    candidates = [["C[C@H](N)O", "CC(N)O"],  # the second, without stereo, is the molecule
                  ["C1CC", "CCO"],            # an unparsable first candidate, then a hit
                  ["CCC", "CCCC"],            # no candidate is
                  ["C1CC"]]                   # the reference does not parse: never a hit
    refs = ["CC(N)O", ["OCC"], "CCN", "C1CC"]
    assert exact_match_at_k(candidates, refs) == pytest.approx(2 / 4)
    assert exact_match_at_k([c[:1] for c in candidates], refs) == 0.0  # the top ones alone
    assert exact_match_at_k([], []) is None
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        exact_match_at_k([["CCO"], ["CCO"]], ["CCO"])


def test_metrics_markdown_shows_top_k_only_when_measured():
    base = {"family": "smiles", "count": 2, "exact_match": 0.5}
    assert "top-k" not in metrics_markdown(base)
    table = metrics_markdown({**base, "top_k": 5, "exact_match_at_k": 0.75})
    assert "| Exact match in the 5 candidates kept (top-k) | 0.7500 |" in table


def test_bleu_counts_an_unsplittable_prediction_as_empty():
    split = SmilesTokenizer().tokenize
    refs = [["CCO"], ["CCN"]]
    # unigrams: 3 matched of 3 + 1 (NLTK counts an empty hypothesis as one unmatched
    # n-gram); brevity penalty: 3 hypothesis tokens against 6 reference tokens
    b1 = corpus_bleu(["CCO", "CC<unk>N"], refs, n=1, split=split)
    assert b1 == pytest.approx(3 / 4 * math.exp(1 - 6 / 3))
    assert corpus_bleu(["CCO", "CCN"], refs, n=1, split=split) == pytest.approx(1.0)


def test_bleu_hand_computed():
    # hypothesis of 4 words, 3 unigram matches, 1 bigram match out of 3; brevity penalty 1
    pred = ["the cat sat down"]
    refs = [["the cat is down"]]
    b1 = corpus_bleu(pred, refs, n=1)
    b2 = corpus_bleu(pred, refs, n=2)
    assert b1 == pytest.approx(3 / 4)
    assert b2 == pytest.approx(math.sqrt(3 / 4 * 1 / 3))


def test_bleu_brevity_penalty_uses_closest_reference():
    pred = ["a b c"]
    refs = [["a b c d e f", "a b c x"]]
    # closest ref length 4 -> BP = exp(1 - 4/3)
    assert corpus_bleu(pred, refs, n=1) == pytest.approx(math.exp(1 - 4 / 3))


def test_validation_metric_dispatch():
    assert validation_metric("exact_match", ["a"], [["a"]]) == 1.0
    assert validation_metric("bleu4", ["a b c d"], [["a b c d"]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown validation metric"):
        validation_metric("cider", ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        exact_match(["a", "b"], [["a"]])


def test_sentence_bleu4_method1_hand_computed():
    # p1 = 3/4, p2 = 1/3, p3 = 0/2 -> 0.1/2, p4 = 0/1 -> 0.1/1 (method1 epsilon 0.1); BP = 1
    expected = (3 / 4 * 1 / 3 * 0.05 * 0.1) ** 0.25
    assert sentence_bleu4("the cat sat down".split(), ["the cat is down".split()]) == (
        pytest.approx(expected))
    assert sentence_bleu4("a b c d e".split(), ["a b c d e".split()]) == pytest.approx(1.0)


def test_our_bleu_is_nltk_not_pycocoevalcap():
    # Same first two orders; NLTK counts a denominator of 1 for "a dog" (no 3-/4-grams),
    # pycocoevalcap does not, so BLEU-3/4 differ. Documented in the module docstring.
    ours = [corpus_bleu(PREDS, REFS, n) for n in range(1, 5)]
    assert ours[:2] == pytest.approx(COCO_BLEU[:2], abs=1e-9)
    assert ours[2] == pytest.approx(0.7145039615899752)
    assert ours[3] == pytest.approx(0.6881940131211701)
    assert ours[3] < COCO_BLEU[3] - 0.02


# --------------------------------------------------------------------------- CIDEr-D / ROUGE-L


def test_cider_d_matches_pycocoevalcap_constants():
    assert cider_d_per_image(PREDS, REFS) == pytest.approx(COCO_CIDER, abs=1e-9)
    assert cider_d(PREDS, REFS) == pytest.approx(3.5093638776080653, abs=1e-9)


def test_rouge_l_matches_pycocoevalcap_constants():
    assert rouge_l_per_image(PREDS, REFS) == pytest.approx(COCO_ROUGE, abs=1e-12)
    assert rouge_l(PREDS, REFS) == pytest.approx(0.6820484949832777, abs=1e-12)


def test_cider_and_rouge_match_pycocoevalcap_live():
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    rouge_mod = pytest.importorskip("pycocoevalcap.rouge.rouge")
    gts, res = _coco_inputs()
    cider, cider_each = cider_mod.Cider().compute_score(gts, res)
    rouge, rouge_each = rouge_mod.Rouge().compute_score(gts, res)
    assert cider_d(PREDS, REFS) == pytest.approx(float(cider), abs=1e-9)
    assert cider_d_per_image(PREDS, REFS) == pytest.approx(list(cider_each), abs=1e-9)
    assert rouge_l(PREDS, REFS) == pytest.approx(float(rouge), abs=1e-12)
    assert rouge_l_per_image(PREDS, REFS) == pytest.approx(list(rouge_each), abs=1e-12)


def test_pycocoevalcap_bleu_constants_live():
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    gts, res = _coco_inputs()
    score, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    assert score == pytest.approx(COCO_BLEU, abs=1e-12)


def test_identical_prediction_scores():
    preds = ["a b c d", "x y z"]
    refs = [["a b c d"], ["x y z"]]
    # cosine 1 for every n-gram order present: 4 orders -> 10, 3-word text has no 4-grams -> 7.5
    assert cider_d_per_image(preds, refs) == pytest.approx([10.0, 7.5])
    assert rouge_l_per_image(preds, refs) == [1.0, 1.0]
    # a one-image corpus has idf 0 everywhere, hence CIDEr-D 0 (as in pycocoevalcap)
    assert cider_d(["a b c d"], [["a b c d"]]) == 0.0


def test_cider_d_length_penalty_and_clipping_hand_computed():
    # unigram tf-idf: hyp {x: 2w}, ref {x: w, y: w}; clipped dot = min(2w, w) * w = w^2,
    # norms 2w and sqrt(2) w -> cos = 1/(2 sqrt 2); bigrams (x x) vs (x y) share nothing.
    # bigram counts 1 vs 1 -> no length penalty. Image 2 is identical (3 words -> 7.5).
    scores = cider_d_per_image(["x x", "p q r"], [["x y"], ["p q r"]])
    assert scores[0] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4)
    assert scores[1] == pytest.approx(7.5)
    # Gaussian penalty exp(-delta^2 / 72) with delta = bigram-count difference (2 - 1 = 1)
    long = cider_d_per_image(["x y z", "p q r"], [["x y"], ["p q r"]])[0]
    # unigrams: hyp {x, y, z}, ref {x, y} -> cos 2/sqrt(6); bigrams (x y) shared -> cos 1/sqrt(2)
    expected = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert long == pytest.approx(expected)


def test_rouge_l_hand_computed():
    # LCS("a b c d", "a c d e f") = 3 -> P = 3/4, R = 3/5, beta = 1.2
    p, r = 3 / 4, 3 / 5
    expected = (1 + 1.44) * p * r / (r + 1.44 * p)
    assert sentence_rouge_l("a b c d".split(), ["a c d e f".split()]) == pytest.approx(expected)
    # pycocoevalcap maxes P and R over references separately: P=1 from one, R=1 from another
    assert sentence_rouge_l("a b c d".split(), ["a b".split(), "a b c d e f g h".split()]) == 1.0
    assert sentence_rouge_l([], ["a".split()]) == 0.0


def test_caption_metrics_and_per_example():
    m = caption_metrics(PREDS, REFS, meteor=False)
    assert m["family"] == "caption" and m["count"] == 5
    assert m["exact_match"] == pytest.approx(1 / 5)
    assert m["bleu4"] == pytest.approx(corpus_bleu(PREDS, REFS, 4))
    assert m["cider_d"] == pytest.approx(sum(COCO_CIDER) / 5)
    assert m["rouge_l"] == pytest.approx(sum(COCO_ROUGE) / 5)
    assert m["meteor"] is None and m["meteor_unavailable"] == "disabled (meteor=False)"
    rows = per_example_caption_metrics(PREDS, REFS)
    assert [r["cider_d"] for r in rows] == pytest.approx(COCO_CIDER)
    assert [r["rouge_l"] for r in rows] == pytest.approx(COCO_ROUGE)
    assert rows[0]["bleu4"] == pytest.approx(1.0) and rows[0]["exact_match"] is True
    assert rows[4]["bleu4"] == 0.0 and rows[4]["exact_match"] is False
    with pytest.raises(ValueError, match="image 1 has no reference"):
        caption_metrics(["a", "b"], [["a"], []], meteor=False)


def test_meteor_unavailable_without_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MeteorUnavailable, match="java not found"):
        meteor_scores(PREDS, REFS)
    m = caption_metrics(PREDS, REFS)
    assert m["meteor"] is None
    assert m["meteor_unavailable"] == "java not found on PATH (METEOR 1.5 is a Java program)"


def test_meteor_unavailable_without_pycocoevalcap(monkeypatch):
    import sys

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setitem(sys.modules, "pycocoevalcap.meteor.meteor", None)
    m = caption_metrics(PREDS, REFS)
    assert m["meteor"] is None and "pip install pycocoevalcap" in m["meteor_unavailable"]


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_matches_pycocoevalcap_when_java_present():
    pytest.importorskip("pycocoevalcap.meteor.meteor")
    score, per_image = meteor_scores(PREDS, REFS)
    assert score == pytest.approx(COCO_METEOR, abs=1e-9)
    assert per_image[0] == pytest.approx(1.0) and per_image[4] == 0.0


# ------------------------------------------------------------------------------------- SMILES


def test_canonical_smiles_and_exact_match():
    assert canonical_smiles("OCC") == canonical_smiles("CCO") == "CCO"
    assert canonical_smiles("C[C@H](N)O", isomeric=False) == "CC(N)O"
    assert canonical_smiles("C1CC") is None
    assert canonical_smiles("") is None
    row = per_example_smiles_metrics(["OCC"], ["CCO"])[0]
    assert row["exact_match"] and row["exact_match_nostereo"] and row["inchi_match"]
    assert row["tanimoto"] == 1.0 and row["levenshtein"] == 0.0


def test_stereo_vs_non_stereo():
    row = per_example_smiles_metrics(["C[C@H](N)O"], ["C[C@@H](N)O"])[0]
    assert row["valid"] is True
    assert row["exact_match"] is False
    assert row["exact_match_nostereo"] is True
    assert row["inchi_match"] is False  # standard InChI keeps the /t /m stereo layers
    assert row["tanimoto"] == 1.0  # Morgan fingerprints ignore chirality by default
    assert row["levenshtein"] == pytest.approx(1 / 11)  # "C[C@H](N)O" vs "C[C@@H](N)O"


def test_invalid_prediction():
    m = smiles_metrics(["C1CC", ""], ["CCC", "CCO"])
    assert m["validity"] == 0.0 and m["tanimoto"] == 0.0 and m["exact_match"] == 0.0
    rows = per_example_smiles_metrics(["C1CC", ""], ["CCC", "CCO"])
    # raw "C1CC" vs canonical "CCC": one deletion over 4 characters; "" vs "CCO": 3/3
    assert [r["levenshtein"] for r in rows] == [0.25, 1.0]
    assert m["levenshtein"] == pytest.approx(0.625)


def test_kinds_of_error():
    preds = ["OCC", "", "C[C@H](N)O", "COC", "CCN", "CCCO", "C1CC"]
    refs = ["CCO", "CCO", "C[C@@H](N)O", "CCO", "CCO", "CCO", "CCO"]
    rows = per_example_smiles_metrics(preds, refs)
    assert [r["error_kind"] for r in rows] == ["none", "invalid", "stereo", "isomer", "atoms",
                                          "size", "invalid"]
    errors = smiles_metrics(preds, refs)["error_kinds"]
    assert errors == pytest.approx({"none": 1 / 7, "invalid": 2 / 7, "stereo": 1 / 7,
                                    "isomer": 1 / 7, "atoms": 1 / 7, "size": 1 / 7})
    md = metrics_markdown(smiles_metrics(preds, refs))
    assert "| invalid | stereo | isomer | atoms | size |" in md
    assert "| 0.2857 | 0.1429 | 0.1429 | 0.1429 | 0.1429 |" in md


def test_inchi_matches_mobile_h_tautomers_only():
    rows = per_example_smiles_metrics(
        ["Oc1ccccn1", "OC(=O)CC(N)=N", "CC(O)=C"],
        ["O=c1cccc[nH]1", "OC(=O)CC(=N)N", "CC(=O)C"])
    # 2-hydroxypyridine / 2-pyridone: different canonical SMILES, same standard InChI
    assert rows[0]["exact_match"] is False and rows[0]["inchi_match"] is True
    # Morgan radius 2, 2048 bits (checked with RDKit 2026.09; radius 1 gives 0.25 here)
    assert rows[0]["tanimoto"] == pytest.approx(5 / 27)
    assert rows[2]["tanimoto"] == pytest.approx(0.3)
    # amidine written both ways: same molecule for RDKit and InChI
    assert rows[1]["exact_match"] is True and rows[1]["inchi_match"] is True
    # keto/enol is not a mobile-H tautomerism in standard InChI
    assert rows[2]["inchi_match"] is False


def test_levenshtein_values():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("", "abc") == 3
    assert levenshtein("CCO", "CCO") == 0
    assert normalized_levenshtein("CCO", "CCN") == pytest.approx(1 / 3)
    assert normalized_levenshtein("c1ccccc1", "C1CCCCC1") == pytest.approx(6 / 8)
    assert normalized_levenshtein("", "") == 0.0


def test_heavy_atom_bins_and_counts():
    assert [heavy_atom_bin(n) for n in (0, 1, 10, 11, 20, 21, 30, 31, 99)] == [
        "1-10", "1-10", "1-10", "11-20", "11-20", "21-30", "21-30", "31+", "31+"]
    preds = ["CCO", "CCCCCCCCCCC", "C" * 21, "C" * 31, "CC(=O)Oc1ccccc1C(=O)O", "C1CC"]
    refs = ["OCC", "CCCCCCCCCCCC", "C" * 21, "C" * 31, "CC(=O)Oc1ccccc1C(=O)O", "CCCCCCCCCC"]
    m = smiles_metrics(preds, refs)
    bins = m["by_heavy_atoms"]
    assert list(bins) == ["1-10", "11-20", "21-30", "31+"]
    assert {k: v["count"] for k, v in bins.items()} == {"1-10": 2, "11-20": 2, "21-30": 1,
                                                         "31+": 1}
    assert bins["1-10"]["validity"] == 0.5 and bins["1-10"]["exact_match"] == 0.5
    # C11 vs C12: different molecules with identical radius-2 Morgan fingerprints
    assert bins["11-20"]["exact_match"] == 0.5 and bins["11-20"]["tanimoto_1"] == 1.0
    assert bins["31+"]["exact_match"] == 1.0
    assert m["count"] == 6 and m["invalid_references"] == 0
    assert m["exact_match"] == pytest.approx(4 / 6) and m["tanimoto_1"] == pytest.approx(5 / 6)
    rows = per_example_smiles_metrics(preds, refs)
    assert [r["heavy_atoms"] for r in rows] == [3, 12, 21, 31, 13, 10]


def test_heavy_atoms_override_and_unknown_bin():
    m = smiles_metrics(["CCO", "CCO"], [["OCC", "CC"], ["CCO"]], heavy_atoms=[25, 40])
    assert m["by_heavy_atoms"]["21-30"]["count"] == 1
    assert m["by_heavy_atoms"]["31+"]["count"] == 1
    assert m["by_heavy_atoms"]["1-10"] == {
        "count": 0, "validity": None, "exact_match": None, "exact_match_nostereo": None,
        "inchi_match": None, "tanimoto": None, "tanimoto_1": None, "levenshtein": None,
        "error_kinds": None}
    m = smiles_metrics(["CCO"], ["C1CC"])
    assert m["invalid_references"] == 1 and m["by_heavy_atoms"]["unknown"]["count"] == 1
    assert m["exact_match"] == 0.0
    with pytest.raises(ValueError, match="1 heavy-atom counts but 2"):
        smiles_metrics(["C", "C"], ["C", "C"], heavy_atoms=[1])


def test_rdkit_logging_suppressed_and_restored(capfd):
    from rdkit import RDLogger, rdBase

    before = rdBase.LogStatus()
    smiles_metrics(["C1CC", "C(C"], ["CCC", "CC"])
    assert "Parse Error" not in capfd.readouterr().err
    assert rdBase.LogStatus() == before
    RDLogger.DisableLog("rdApp.warning")
    try:
        canonical_smiles("C1CC")
        assert "rdApp.warning:disabled" in rdBase.LogStatus()
        assert "rdApp.error:enabled" in rdBase.LogStatus()
    finally:
        RDLogger.EnableLog("rdApp.warning")


# ------------------------------------------------------------------------ dispatch / markdown


def test_metric_family_and_dispatch():
    assert metric_family("word") == "caption"
    assert metric_family("smiles") == metric_family("char") == "smiles"
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        metric_family("bpe")
    cap = compute_metrics("caption", PREDS, REFS, meteor=False)
    assert cap["cider_d"] == pytest.approx(sum(COCO_CIDER) / 5)
    mol = compute_metrics("smiles", ["OCC"], ["CCO"], heavy_atoms=[3])
    assert mol["exact_match"] == 1.0
    with pytest.raises(ValueError, match="unknown metric family"):
        compute_metrics("images", [], [])


def test_markdown_contains_numbers():
    cap = metrics_markdown(caption_metrics(PREDS, REFS, meteor=False))
    assert "| CIDEr-D | 3.5094 |" in cap
    assert "| ROUGE-L | 0.6820 |" in cap
    assert "| BLEU-1 | 0.7210 |" in cap
    assert "| METEOR | n/a (disabled (meteor=False)) |" in cap
    assert "| Images | 5 |" in cap
    mol = metrics_markdown(smiles_metrics(["OCC", "C1CC", "C" * 12], ["CCO", "CCC", "C" * 12]))
    assert "| Validity | 0.6667 |" in mol
    assert "| Exact match (canonical) | 0.6667 |" in mol
    assert "| 1-10 | 2 | 0.5000 | 0.5000 |" in mol
    assert "| 11-20 | 1 | 1.0000 | 1.0000 |" in mol
    assert "| 21-30 | 0 | n/a |" in mol
