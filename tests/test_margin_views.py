"""scripts/margin_views.py: the choices it scores (vote, union of candidates) on fixed inputs."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def script(load_script):
    return load_script("margin_views")


def test_first_valid_skips_what_rdkit_cannot_read(script):
    assert script.first_valid(["C1CC", "OCC", "CC"]) == "CCO"
    assert script.first_valid(["C1CC", "(("]) is None


def test_vote_takes_the_most_margins_and_ties_go_to_the_own_margin(script):
    firsts = {0.1: ["CO", "CC", None], 0.15: ["CC", "CN", None], 0.2: ["CO", "CC", None]}
    assert script.vote(firsts, own=0.15) == ["CO", "CC", None]
    tie = {0.1: ["CO"], 0.15: ["CC"]}
    assert script.vote(tie, own=0.15) == ["CC"]


def test_union_sums_the_spellings_of_one_molecule(script):
    union = [["CCO", "OCC", "CCN"],  # two spellings of ethanol: 0.3 + 0.3 beat 0.4
             ["C1CC", "CC"]]  # the invalid text never wins
    scores = np.log([[0.3, 0.3, 0.4], [0.9, 0.1, 1.0]])  # (B, N); past a row's end unused
    picks = script.union_pick(union, scores)
    assert picks == ["CCO", "CC"]
    assert script.exact(picks, ["CCO", "CCC"]) == pytest.approx(0.5)
