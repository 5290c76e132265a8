"""Tests for captioner.tokenizers."""

from __future__ import annotations

import doctest
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captioner.choices import Choices
from captioner.data import tokenizers
from captioner.data.tokenizers import (
    CharTokenizer,
    SelfiesTokenizer,
    SmilesTokenizer,
    Tokenizer,
    WordTokenizer,
)

SPECIALS = ["<pad>", "<start>", "<end>", "<unk>"]
CORPORA = {
    "word": ["A man rides a horse.", "Two dogs play in the snow!", "a man and a dog"],
    "smiles": ["CCO", "c1ccccc1", "[Na+].[Cl-]", "Br/C=C\\Cl"],
    "char": ["abc", "hello world", "ÄÖü"],
    "selfies": ["CCO", "c1ccccc1", "[Na+].[Cl-]", "Br/C=C\\Cl"],
}
REAL_SMILES = [
    "CCN(Cc1ccc(OC)c(OC)c1)C(=O)c1ccsc1",
    "Cc1ccc(CNc2ncnc(N3C[C@@]4(C)C[C@@H]3CC(C)(C)C4)c2N)cc1",
    "[Na+].[Cl-]",
    "C%12CC%12",
    "Br/C=C\\Cl",
]
SMILES_ATOMS = list("NOSPFIbcnosp()=#-+\\/:~@?>*$.0123456789") + ["B", "Br", "C", "Cl"]
FAST = settings(max_examples=60, deadline=None)


def fitted(kind: str) -> Tokenizer:
    return Tokenizer.create(kind).fit(CORPORA[kind])


# ----------------------------------------------------------------- special tokens
@pytest.mark.parametrize("kind", ["word", "smiles", "char", "selfies"])
def test_special_ids_fixed_after_fit_and_load(kind: str, tmp_path: Path) -> None:
    tok = fitted(kind)
    assert (tok.pad_id, tok.start_id, tok.end_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab[:4] == SPECIALS
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.vocab[:4] == SPECIALS
    assert [loaded.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3]


def test_special_tokens_in_text_never_become_control_ids() -> None:
    tok = WordTokenizer(strip_punctuation=False).fit(["<end> <pad> cat"])
    assert tok.vocab == SPECIALS + ["cat"]
    assert tok.encode("<end> cat") == [1, 3, 4, 2]


def test_encode_requires_fit() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        WordTokenizer().encode("a cat")


# ------------------------------------------------------------------ word tokenizer
words = st.text(alphabet="abcdefghijklmnop", min_size=1, max_size=6)
sentences = st.lists(words, min_size=0, max_size=8).map(" ".join)


@FAST
@given(st.lists(sentences, min_size=1, max_size=5))
def test_word_round_trip_lowercase_words(texts: list[str]) -> None:
    tok = WordTokenizer().fit(texts)
    for text in texts:
        ids = tok.encode(text)
        assert ids[0] == tok.start_id and ids[-1] == tok.end_id
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text


@FAST
@given(st.lists(st.text(max_size=30), min_size=1, max_size=5))
def test_word_round_trip_returns_normalized_text(texts: list[str]) -> None:
    tok = WordTokenizer().fit(texts)
    for text in texts:
        # words spelled like a special token ("<START>" -> "<start>") are never in the
        # vocabulary, so they come back as <unk>
        expected = [w if w not in tok.special_tokens else "<unk>" for w in tok.tokenize(text)]
        assert tok.decode(tok.encode(text)) == " ".join(expected)


def test_special_token_spellings_in_text_are_unknown() -> None:
    tok = WordTokenizer().fit(["<START> a b <end>"])
    assert tok.encode("<START> a <end>") == [1, tok.unk_id, tok.token_to_id("a"), tok.unk_id, 2]


def test_word_normalization() -> None:
    assert WordTokenizer().tokenize("A Man, riding\t«a» horse!") == [
        "a",
        "man",
        "riding",
        "a",
        "horse",
    ]
    assert WordTokenizer(lower=False, strip_punctuation=False).tokenize("A b.") == ["A", "b."]
    assert WordTokenizer().detokenize(["a", "b"]) == "a b"


def test_word_unknown_maps_to_unk() -> None:
    tok = WordTokenizer().fit(["a cat"])
    assert tok.encode("a zebra cat") == [1, tok.token_to_id("a"), 3, tok.token_to_id("cat"), 2]
    assert tok.token_to_id("zebra") == tok.unk_id
    assert tok.decode(tok.encode("a zebra")) == "a <unk>"


def test_word_vocab_order_is_deterministic() -> None:
    texts = ["b a c", "c b", "d c"]
    tok = WordTokenizer().fit(texts)
    # c:3, b:2, then a/d tied at 1 -> alphabetical
    assert tok.vocab == SPECIALS + ["c", "b", "a", "d"]
    assert WordTokenizer().fit(reversed(texts)).vocab == tok.vocab
    assert tok.vocab_size == 8


def test_word_max_vocab_and_min_count() -> None:
    texts = ["a a a b b c", "a b d"]
    assert WordTokenizer(max_vocab=6).fit(texts).vocab == SPECIALS + ["a", "b"]
    assert WordTokenizer(max_vocab=4).fit(texts).vocab == SPECIALS
    assert WordTokenizer(min_count=2).fit(texts).vocab == SPECIALS + ["a", "b"]
    assert WordTokenizer(min_count=3, max_vocab=100).fit(texts).vocab == SPECIALS + ["a", "b"]
    assert WordTokenizer(min_count=4).fit(texts).vocab == SPECIALS + ["a"]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_vocab": 3}, ValueError),
        ({"min_count": 0}, ValueError),
        ({"lower": "yes"}, TypeError),
        ({"max_vocab": 5.0}, TypeError),
    ],
)
def test_word_bad_options(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        WordTokenizer(**kwargs)


def test_refit_replaces_vocab() -> None:
    tok = WordTokenizer().fit(["x y"])
    tok.fit(["z"])
    assert tok.vocab == SPECIALS + ["z"]


# ------------------------------------------------------------------ char tokenizer
@FAST
@given(st.lists(st.text(min_size=0, max_size=20), min_size=1, max_size=5))
def test_char_round_trip(texts: list[str]) -> None:
    tok = CharTokenizer().fit(texts)
    for text in texts:
        ids = tok.encode(text, add_special=False)
        assert len(ids) == len(text)
        assert tok.unk_id not in ids
        assert tok.decode(tok.encode(text)) == text


def test_char_lower_and_unknown() -> None:
    tok = CharTokenizer(lower=True).fit(["AbA"])
    assert tok.vocab == SPECIALS + ["a", "b"]
    assert tok.decode(tok.encode("BAz")) == "ba<unk>"


# ---------------------------------------------------------------- SMILES tokenizer
bracket_atoms = st.text(
    alphabet=st.characters(blacklist_characters="]", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=6,
).map(lambda s: f"[{s}]")
ring_closures = st.integers(10, 99).map(lambda n: f"%{n}")
smiles_tokens = st.lists(
    st.one_of(st.sampled_from(SMILES_ATOMS), bracket_atoms, ring_closures), max_size=30
)


@FAST
@given(smiles_tokens)
def test_smiles_tokenize_inverts_join(tokens: list[str]) -> None:
    smiles = "".join(tokens)
    result = SmilesTokenizer().tokenize(smiles)
    assert "".join(result) == smiles
    assert result == tokens


@FAST
@given(st.lists(smiles_tokens.map("".join), min_size=1, max_size=4))
def test_smiles_encode_decode_round_trip(smiles_list: list[str]) -> None:
    tok = SmilesTokenizer().fit(smiles_list)
    for smiles in smiles_list:
        assert tok.decode(tok.encode(smiles)) == smiles


@pytest.mark.parametrize("smiles", REAL_SMILES)
def test_real_smiles_round_trip(smiles: str) -> None:
    tok = SmilesTokenizer().fit(REAL_SMILES)
    assert "".join(tok.tokenize(smiles)) == smiles
    assert tok.decode(tok.encode(smiles)) == smiles
    tok.validate(smiles)


def test_smiles_token_boundaries() -> None:
    tok = SmilesTokenizer()
    assert tok.tokenize("[Na+].[Cl-]") == ["[Na+]", ".", "[Cl-]"]
    assert tok.tokenize("C%12CC%12") == ["C", "%12", "C", "C", "%12"]
    assert tok.tokenize("Br/C=C\\Cl") == ["Br", "/", "C", "=", "C", "\\", "Cl"]
    assert tok.tokenize("C[C@@H](O)c1ccccc1") == [
        "C",
        "[C@@H]",
        "(",
        "O",
        ")",
        "c",
        "1",
        "c",
        "c",
        "c",
        "c",
        "c",
        "1",
    ]
    assert tok.tokenize("") == []


@pytest.mark.parametrize(
    ("smiles", "position", "char"),
    [("C&C", 1, "&"), ("CCX", 2, "X"), ("C[NH", 1, "["), ("C%1", 1, "%"), ("CC O", 2, " ")],
)
def test_smiles_uncovered_character_raises(smiles: str, position: int, char: str) -> None:
    tok = SmilesTokenizer()
    with pytest.raises(ValueError, match=f"position {position}") as info:
        tok.tokenize(smiles)
    assert repr(smiles) in str(info.value)
    assert repr(char) in str(info.value)
    with pytest.raises(ValueError, match=f"position {position}"):
        tok.validate(smiles)


def test_smiles_fit_error_names_text_index() -> None:
    with pytest.raises(ValueError, match=r"text 2: .*'CCX'.*position 2"):
        SmilesTokenizer().fit(["CCO", "c1ccccc1", "CCX", "CC"])


# ------------------------------------------------------------------ encode_batch
def test_encode_batch_shape_padding_truncation() -> None:
    tok = WordTokenizer().fit(["a b c d e f"])
    batch = tok.encode_batch(["a b", "a b c d e f", ""], max_length=5)
    assert batch.dtype == np.int32
    assert batch.shape == (3, 5)
    a, b, c = (tok.token_to_id(w) for w in "abc")
    assert batch[0].tolist() == [1, a, b, 2, 0]
    assert batch[1].tolist() == [1, a, b, c, 2]
    assert batch[2].tolist() == [1, 2, 0, 0, 0]
    assert tok.decode(batch[1]) == "a b c"
    assert tok.encode_batch([], max_length=4).shape == (0, 4)


@FAST
@given(st.lists(sentences, min_size=1, max_size=6), st.integers(2, 12))
def test_encode_batch_properties(texts: list[str], max_length: int) -> None:
    tok = WordTokenizer().fit(texts)
    batch = tok.encode_batch(texts, max_length)
    assert batch.shape == (len(texts), max_length)
    for row, text in zip(batch, texts, strict=True):
        full = tok.encode(text)
        n = min(len(full), max_length)
        assert row[0] == tok.start_id
        assert row[n - 1] == tok.end_id
        assert (row[n:] == tok.pad_id).all()
        assert row[: n - 1].tolist() == full[: n - 1]


def test_encode_batch_rejects_tiny_max_length() -> None:
    with pytest.raises(ValueError, match="max_length"):
        fitted("word").encode_batch(["a"], max_length=1)


# -------------------------------------------------------------------- decoding
def test_decode_stops_at_end_and_skips_pad_start() -> None:
    tok = WordTokenizer().fit(["a b"])
    a, b = tok.token_to_id("a"), tok.token_to_id("b")
    assert tok.decode([1, a, 0, b, 2, a, a]) == "a b"
    assert tok.ids_to_tokens(np.array([1, a, 3, 2, b])) == ["a", "<unk>"]
    assert tok.decode([1, a, 2, 0], strip_special=False) == "<start> a <end> <pad>"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([1, 99])


# ---------------------------------------------------------------- serialisation
@pytest.mark.parametrize(
    "tok",
    [
        WordTokenizer(lower=False, strip_punctuation=False, max_vocab=10, min_count=1),
        WordTokenizer(),
        SmilesTokenizer(),
        CharTokenizer(lower=True),
        SelfiesTokenizer(canonical=False),
    ],
    ids=repr,
)
def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    texts = CORPORA[tok.kind]
    tok.fit(texts)
    path = tmp_path / "tok.json"
    tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    params = set(inspect.signature(type(tok).__init__).parameters) - {"self"}
    assert set(data) == {"kind", "vocab"} | params
    loaded = Tokenizer.load(path)
    assert type(loaded) is type(tok)
    assert loaded.to_dict() == tok.to_dict()
    assert loaded.vocab == tok.vocab
    np.testing.assert_array_equal(loaded.encode_batch(texts, 16), tok.encode_batch(texts, 16))


def test_save_writes_utf8_indented_json(tmp_path: Path) -> None:
    path = tmp_path / "tok.json"
    CharTokenizer().fit(["é"]).save(path)
    text = path.read_text(encoding="utf-8")
    assert '\n  "kind": "char"' in text
    assert "é" in text


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d.pop("vocab"), "vocab"),
        (lambda d: d.pop("kind"), "kind"),
        (lambda d: d.pop("min_count"), "min_count"),
        (lambda d: d.update(kind="bpe"), "kind"),
        (lambda d: d.update(vocab=["a", "b"]), "vocab"),
        (lambda d: d.update(vocab="abc"), "vocab"),
        (lambda d: d.update(min_count=0), "min_count"),
        (lambda d: d.update(lower="no"), "lower"),
        (lambda d: d.update(extra=1), "extra"),
    ],
)
def test_load_corrupted_file_names_file_and_key(mutate, key: str, tmp_path: Path) -> None:
    data = fitted("word").to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=key) as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_load_invalid_json_names_file(content: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(path)


def test_from_dict_dispatches_on_kind() -> None:
    for kind, cls in [
        ("word", WordTokenizer),
        ("smiles", SmilesTokenizer),
        ("char", CharTokenizer),
        ("selfies", SelfiesTokenizer),
    ]:
        tok = Tokenizer.from_dict(fitted(kind).to_dict())
        assert type(tok) is cls
        assert tok.kind == kind
    assert isinstance(WordTokenizer.from_dict(fitted("word").to_dict()), WordTokenizer)
    with pytest.raises(ValueError, match="kind"):
        WordTokenizer.from_dict(fitted("char").to_dict())


# -------------------------------------------------------------------- factory
def test_create_factory() -> None:
    tok = Tokenizer.create("word", max_vocab=50, min_count=2)
    assert isinstance(tok, WordTokenizer)
    assert (tok.max_vocab, tok.min_count) == (50, 2)
    assert isinstance(Tokenizer.create("smiles"), SmilesTokenizer)
    assert isinstance(Tokenizer.create("char", lower=True), CharTokenizer)
    assert isinstance(Tokenizer.create("selfies", canonical=False), SelfiesTokenizer)
    assert Tokenizer.kinds() == ("word", "smiles", "char", "selfies")
    assert Tokenizer.kinds() == Choices().tokenizer  # the config accepts exactly these


def test_create_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match="bpe") as info:
        Tokenizer.create("bpe")
    for kind in ("word", "smiles", "char", "selfies"):
        assert repr(kind) in str(info.value)


def test_docstring_examples() -> None:
    result = doctest.testmod(tokenizers)
    assert result.attempted > 0
    assert result.failed == 0
