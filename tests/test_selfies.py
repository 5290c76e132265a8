"""Tests for the SELFIES tokenizer: SMILES in and out, SELFIES symbols as tokens."""

from __future__ import annotations

import doctest
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sf = pytest.importorskip("selfies")
pytest.importorskip("rdkit")

from captioner.data.chem import canonical_smiles, parse  # noqa: E402
from captioner.data.tokenizers import (  # noqa: E402
    SelfiesTokenizer,
    SmilesTokenizer,
    Tokenizer,
)

MOLECULES = [
    "CCO",                                    # chain
    "c1ccccc1O",                              # aromatic ring
    "c1ccc2c(c1)[nH]c1ccccc12",               # fused aromatic, [nH]
    "C1CC2CCC1C2",                            # bicyclic (two ring closures)
    "CC(C)(C)C(=O)N(C)C",                     # nested branches
    "C%12CC%12",                              # two-digit ring label
    "[Na+].[Cl-]",                            # disconnected ions
    "O=[N+]([O-])c1ccccc1",                   # charge-separated nitro
    "C[NH3+]",                                # charged with explicit H
    "C[C@H](N)C(=O)O",                        # tetrahedral stereo
    "F/C=C/F",                                # E double bond
    "F/C=C\\F",                               # Z double bond
    "[2H]C([2H])([2H])O",                     # isotopes
    "C[S@@](=O)c1ccccc1",                     # stereo sulfoxide
    "Cc1ccc(CNc2ncnc(N3C[C@@]4(C)C[C@@H]3CC(C)(C)C4)c2N)cc1",  # ZINC drug-like
]
NON_ATOMS = {"."}  # plus every ring and branch symbol, see is_atom


def is_atom(symbol: str) -> bool:
    return symbol not in NON_ATOMS and "Ring" not in symbol and "Branch" not in symbol


@pytest.fixture(scope="module")
def tok() -> SelfiesTokenizer:
    return SelfiesTokenizer().fit(MOLECULES)


# ------------------------------------------------------------------- round trip
@pytest.mark.parametrize("smiles", MOLECULES)
def test_round_trip_gives_the_canonical_smiles(tok: SelfiesTokenizer, smiles: str) -> None:
    ids = tok.encode(smiles)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == canonical_smiles(smiles)


@pytest.mark.parametrize("smiles", MOLECULES)
def test_round_trip_without_canonical_is_the_same_molecule(smiles: str) -> None:
    raw = SelfiesTokenizer(canonical=False).fit([smiles])
    out = raw.decode(raw.encode(smiles))
    assert out == sf.decoder(sf.encoder(smiles))  # the decoder's own spelling
    assert canonical_smiles(out) == canonical_smiles(smiles)


def test_round_trip_of_a_non_canonical_spelling(tok: SelfiesTokenizer) -> None:
    assert tok.decode(tok.encode("OC1=CC=CC=C1")) == "Oc1ccccc1"
    assert tok.decode(tok.encode("N[C@@H](C)C(O)=O")) == "C[C@H](N)C(=O)O"


# ---------------------------------------------------------------- tokens and ids
def test_tokens_are_selfies_symbols(tok: SelfiesTokenizer) -> None:
    assert tok.tokenize("c1ccccc1") == ["[C]", "[=C]", "[C]", "[=C]", "[C]", "[=C]", "[Ring1]",
                                        "[=Branch1]"]
    assert tok.tokenize("CC(=O)[O-]") == ["[C]", "[C]", "[=Branch1]", "[C]", "[=O]", "[O-1]"]
    assert tok.tokenize("[Na+].[Cl-]") == ["[Na+1]", ".", "[Cl-1]"]
    for smiles in MOLECULES:
        assert "".join(tok.tokenize(smiles)) == sf.encoder(smiles)


def test_ids_to_tokens_shows_symbols_and_joiner_gives_selfies(tok: SelfiesTokenizer) -> None:
    ids = tok.encode("CC(C)(C)C(=O)N(C)C") + [tok.pad_id, tok.pad_id]
    symbols = tok.ids_to_tokens(ids)
    assert symbols == tok.tokenize("CC(C)(C)C(=O)N(C)C")
    assert "[Branch1]" in symbols and "[=O]" in symbols
    # what an export joining the vocabulary strings with `joiner` produces: SELFIES
    assert tok.joiner.join(symbols) == sf.encoder("CC(C)(C)C(=O)N(C)C")


def test_empty_smiles_encodes_to_start_end_and_decodes_to_empty(tok: SelfiesTokenizer) -> None:
    assert tok.tokenize("") == []
    assert tok.encode("") == [tok.start_id, tok.end_id]
    assert tok.decode([tok.start_id, tok.end_id]) == ""
    assert tok.decode([]) == ""


def test_decode_stops_at_end_and_leaves_special_tokens_out(tok: SelfiesTokenizer) -> None:
    c, o = tok.token_to_id("[C]"), tok.token_to_id("[O]")
    assert tok.decode([tok.start_id, c, o, tok.end_id, c, c]) == "CO"
    assert tok.decode([c, tok.unk_id, o]) == "CO"
    assert tok.decode([tok.start_id, c, o, tok.end_id, c], strip_special=False) == "COC"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([c, tok.vocab_size])


def test_encode_counted_and_encode_batch_count_selfies_symbols() -> None:
    smiles = "OC(=O)C"  # 7 SMILES-regex tokens, 6 SELFIES symbols
    assert len(SmilesTokenizer().tokenize(smiles)) == 7
    tok = SelfiesTokenizer().fit([smiles])
    assert tok.tokenize(smiles) == ["[O]", "[C]", "[=Branch1]", "[C]", "[=O]", "[C]"]
    assert tok.encode_counted([smiles], 8).truncated == 0
    counted = tok.encode_counted([smiles, smiles, "CC"], 7)
    assert counted.truncated == 2
    assert (counted.ids == tok.encode_batch([smiles, smiles, "CC"], 7)).all()
    full = tok.encode_batch([smiles, "CC"], 10)
    assert full.shape == (2, 10) and full.dtype == np.int32
    assert full[0].tolist() == tok.encode(smiles) + [tok.pad_id] * 2
    cut = tok.encode_batch([smiles], 7)[0].tolist()
    assert cut == tok.encode(smiles)[:6] + [tok.end_id]
    assert tok.decode(cut) == canonical_smiles(sf.decoder("[O][C][=Branch1][C][=O]"))


# --------------------------------------------------------------------- validity
def test_random_id_sequences_decode_to_valid_molecules() -> None:
    # every atom here has a real SELFIES bond limit (no [Na+1], no [Cl-1])
    organic = [m for m in MOLECULES if "Na+" not in m] + ["C[S+](C)C", "OB(O)c1ccccc1Br"]
    tok = SelfiesTokenizer().fit(organic)
    rng = np.random.default_rng(0)
    empty = 0
    for _ in range(400):
        ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(0, 30))).tolist()
        out = tok.decode(ids)
        symbols = [t for t in tok.ids_to_tokens(ids) if t not in tok.special_tokens]
        if not any(is_atom(s) for s in symbols):
            assert out == ""
            empty += 1
            continue
        assert parse(out) is not None, (symbols, out)
        assert out == canonical_smiles(out)
    assert 0 < empty < 400  # both kinds of sequence were drawn


def test_symbols_break_valence_rules_yet_decode_validly(tok: SelfiesTokenizer) -> None:
    # As SMILES, a pentavalent carbon; as SELFIES, the bonds beyond valence are dropped.
    assert parse("C(C)(C)(C)(C)C") is None
    ids = [tok.token_to_id(t) for t in ["[C]", "[Branch1]", "[C]", "[C]"] * 3]
    assert tok.unk_id not in ids
    assert parse(tok.decode(ids)) is not None
    assert tok.detokenize(["[F]", "[F]", "[F]"]) == "FF"


def test_atoms_without_a_bond_limit_can_decode_to_what_rdkit_rejects(
        tok: SelfiesTokenizer) -> None:
    # the documented limit: [Cl-1] may take up to 8 bonds in SELFIES, none in RDKit
    ids = [tok.token_to_id("[Cl-1]"), tok.token_to_id("[C]")]
    assert tok.unk_id not in ids
    out = tok.decode(ids)
    assert out == "[Cl-1]C"  # the decoder's spelling, as RDKit has no canonical one
    assert parse(out) is None
    assert parse(tok.decode([tok.token_to_id("[Na+1]"), tok.token_to_id("[C]")])) is not None


# ------------------------------------------------------------------- vocabulary
def test_vocabulary_is_the_training_symbols_by_count_then_name() -> None:
    tok = SelfiesTokenizer().fit(["CCO", "CC=O", "C#N"])
    assert tok.vocab == ["<pad>", "<start>", "<end>", "<unk>",
                         "[C]", "[#N]", "[=O]", "[O]"]
    assert tok.encode("CN") == [1, 4, 3, 2]  # [N] was never seen
    assert SelfiesTokenizer().fit(["C#N", "CC=O", "CCO"]).vocab == tok.vocab


def test_vocabulary_of_the_test_molecules(tok: SelfiesTokenizer) -> None:
    expected = sorted({s for m in MOLECULES for s in sf.split_selfies(sf.encoder(m))})
    assert sorted(tok.vocab[4:]) == expected
    assert {"[Ring1]", "[=Branch1]", "[C@H1]", "[/F]", "[O-1]", "[Na+1]", "."} <= set(expected)


# -------------------------------------------------------------------- save/load
@pytest.mark.parametrize("canonical", [True, False])
def test_save_load_round_trip(canonical: bool, tmp_path: Path) -> None:
    tok = SelfiesTokenizer(canonical=canonical).fit(MOLECULES)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {"kind": "selfies", "canonical": canonical, "vocab": tok.vocab}
    loaded = Tokenizer.load(path)
    assert type(loaded) is SelfiesTokenizer
    assert loaded.to_dict() == tok.to_dict()
    np.testing.assert_array_equal(loaded.encode_batch(MOLECULES, 64),
                                  tok.encode_batch(MOLECULES, 64))
    assert [loaded.decode(loaded.encode(m)) for m in MOLECULES] == \
           [tok.decode(tok.encode(m)) for m in MOLECULES]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["vocab"].append("C"), "'C' is not a SELFIES symbol"),
        (lambda d: d["vocab"].append("[C][O]"), r"'\[C\]\[O\]' is not a SELFIES symbol"),
        (lambda d: d["vocab"].append("[Xx]"), r"'\[Xx\]' is not a SELFIES symbol"),
        (lambda d: d.update(canonical="yes"), "canonical"),
        (lambda d: d.pop("canonical"), "canonical"),
    ],
)
def test_load_rejects_a_bad_file_naming_it(mutate, match: str, tmp_path: Path) -> None:
    data = SelfiesTokenizer().fit(["CCO"]).to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("smiles", "reason"),
    [
        ("CS(=O)(=O)(=O)C", r"S with 8 bond\(s\) - a max. of 6"),
        ("C(C)(C)(C)(C)C", r"C with 5 bond\(s\) - a max. of 4"),
        ("*C", "failed to parse input"),
        ("C1CC", "failed to parse input"),
    ],
)
def test_unencodable_smiles_raises_naming_it(tok: SelfiesTokenizer, smiles: str,
                                             reason: str) -> None:
    for call in (tok.tokenize, tok.encode, tok.validate):
        with pytest.raises(ValueError, match=reason) as info:
            call(smiles)  # twice over: a failure is never cached as a success
        assert f"cannot encode SMILES {smiles!r} as SELFIES" in str(info.value)
        assert "\n" not in str(info.value)


def test_fit_error_names_the_text_index() -> None:
    with pytest.raises(ValueError, match=r"text 2: cannot encode SMILES '\*C'"):
        SelfiesTokenizer().fit(["CCO", "CC", "*C"])


def test_detokenize_rejects_non_symbols(tok: SelfiesTokenizer) -> None:
    with pytest.raises(ValueError, match="cannot decode SELFIES"):
        tok.detokenize(["[C]", "[Xx]"])


def test_bad_option_and_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TypeError, match="canonical"):
        SelfiesTokenizer(canonical=1)
    monkeypatch.setitem(sys.modules, "rdkit", None)
    with pytest.raises(ImportError, match="RDKit"):
        SelfiesTokenizer()
    assert SelfiesTokenizer(canonical=False).fit(["CO"]).decode([1, 4, 5, 2]) == "CO"
    monkeypatch.setitem(sys.modules, "selfies", None)
    with pytest.raises(ImportError, match="pip install selfies"):
        Tokenizer.create("selfies", canonical=False)


# ---------------------------------------------------------------------- factory
def test_created_by_kind() -> None:
    assert "selfies" in Tokenizer.kinds()
    tok = Tokenizer.create("selfies")
    assert isinstance(tok, SelfiesTokenizer) and tok.canonical
    assert Tokenizer.from_dict(SelfiesTokenizer().fit(["C"]).to_dict()).kind == "selfies"


def test_class_docstring_example() -> None:
    tests = doctest.DocTestFinder().find(SelfiesTokenizer, "SelfiesTokenizer",
                                         globs={"SelfiesTokenizer": SelfiesTokenizer})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 6
    assert result.failed == 0
