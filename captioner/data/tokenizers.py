"""Text tokenizers for caption targets: words, SMILES strings, SELFIES symbols and characters.

All tokenizers share the same special tokens (``<pad>``=0, ``<start>``=1, ``<end>``=2,
``<unk>``=3), a deterministic vocabulary, batch encoding to padded ``int32`` arrays and
JSON (de)serialisation. This module is pure Python + numpy; the ``selfies`` kind also
needs the ``selfies`` package (and RDKit for canonical output), imported when it is built.
"""

from __future__ import annotations

import functools
import inspect
import json
import operator
import os
import re
import unicodedata
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from captioner.data.chem import canonical_smiles, chem
from captioner.fileio import atomic_write_text


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name!r} must be a bool, got {value!r}")
    return value


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name!r} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name!r} must be >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Encoded:
    """Texts encoded by :meth:`Tokenizer.encode_counted`: ``ids`` (N, max_length) int32
    and how many texts were ``truncated`` to fit.

    Example:
        >>> enc = CharTokenizer().fit(["abc"]).encode_counted(["abc", "a"], 4)
        >>> enc.ids.tolist(), enc.truncated
        ([[1, 4, 5, 2], [1, 4, 2, 0]], 1)
    """

    ids: np.ndarray
    truncated: int


class Tokenizer(ABC):
    """Base class: vocabulary, special tokens, encoding/decoding and serialisation.

    Subclasses implement :meth:`tokenize` and :attr:`options` and set :attr:`joiner`.

    Example:
        >>> tok = Tokenizer.create("word").fit(["a cat", "a dog"])
        >>> tok.encode("a cat")
        [1, 4, 5, 2]
        >>> tok.decode([1, 4, 5, 2, 0, 0])
        'a cat'
    """

    pad_id: ClassVar[int] = 0
    start_id: ClassVar[int] = 1
    end_id: ClassVar[int] = 2
    unk_id: ClassVar[int] = 3
    special_tokens: ClassVar[tuple[str, ...]] = ("<pad>", "<start>", "<end>", "<unk>")
    kind: ClassVar[str]
    joiner: ClassVar[str] = ""  # what detokenize puts between tokens (exports use it too)

    def __init__(self) -> None:
        self._vocab: list[str] = list(self.special_tokens)
        self._index: dict[str, int] = {tok: i for i, tok in enumerate(self._vocab)}
        self._fitted = False

    # ----------------------------------------------------------------- abstract API
    @abstractmethod
    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into string tokens."""

    def detokenize(self, tokens: list[str]) -> str:
        """Join string tokens back into text with :attr:`joiner`."""
        return self.joiner.join(tokens)

    @property
    @abstractmethod
    def options(self) -> dict[str, Any]:
        """Constructor options (JSON-serialisable), keyed by argument name."""

    # ------------------------------------------------------------------- vocabulary
    @property
    def vocab(self) -> list[str]:
        """Copy of the vocabulary; index = token id."""
        return list(self._vocab)

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary, specials included."""
        return len(self._vocab)

    @property
    def is_fitted(self) -> bool:
        """Whether a vocabulary was built by :meth:`fit` or loaded."""
        return self._fitted

    def fit(self, texts: Iterable[str]) -> Self:
        """Build the vocabulary from ``texts`` (replacing any previous one)."""
        counts: Counter[str] = Counter()
        for i, text in enumerate(texts):
            try:
                counts.update(self.tokenize(text))
            except ValueError as err:
                raise ValueError(f"text {i}: {err}") from err
        for special in self.special_tokens:
            counts.pop(special, None)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        self._set_vocab(list(self.special_tokens) + self._select(ranked))
        return self

    def _select(self, ranked: list[tuple[str, int]]) -> list[str]:
        """Choose the non-special tokens to keep from ``(token, count)`` pairs."""
        return [tok for tok, _ in ranked]

    def _set_vocab(self, vocab: list[str]) -> None:
        self._vocab = list(vocab)
        self._index = {tok: i for i, tok in enumerate(self._vocab)}
        self._fitted = True

    def token_to_id(self, token: str) -> int:
        """Id of ``token`` (specials included); unknown tokens give ``unk_id``."""
        return self._index.get(token, self.unk_id)

    def _text_token_id(self, token: str) -> int:
        # Literal special strings inside a text are never treated as control tokens.
        if token in self.special_tokens:
            return self.unk_id
        return self._index.get(token, self.unk_id)

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() or load()")

    # ------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``, wrapped in ``[start_id, ..., end_id]`` if ``add_special``."""
        self._require_fitted()
        ids = [self._text_token_id(tok) for tok in self.tokenize(text)]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def ids_to_tokens(self, ids: Iterable[int], strip_special: bool = True) -> list[str]:
        """Tokens for ``ids``; if ``strip_special``, stop at end_id and skip pad/start."""
        tokens: list[str] = []
        for raw in ids:
            idx = operator.index(raw)
            if strip_special and idx == self.end_id:
                break
            if strip_special and idx in (self.pad_id, self.start_id):
                continue
            if not 0 <= idx < len(self._vocab):
                raise ValueError(f"token id {idx} out of range [0, {len(self._vocab)})")
            tokens.append(self._vocab[idx])
        return tokens

    def decode(self, ids: Iterable[int], strip_special: bool = True) -> str:
        """Text for ``ids`` (see :meth:`ids_to_tokens`); ``unk_id`` renders as ``<unk>``."""
        return self.detokenize(self.ids_to_tokens(ids, strip_special=strip_special))

    def encode_batch(self, texts: Iterable[str], max_length: int) -> np.ndarray:
        """``int32`` array ``(N, max_length)`` of ``[start .. end]`` rows, padded with pad_id.

        Longer sequences are truncated so that the last kept position is ``end_id``
        (:meth:`encode_counted` also says how many were).
        """
        return self.encode_counted(texts, max_length).ids

    def encode_counted(self, texts: Iterable[str], max_length: int) -> Encoded:
        """:meth:`encode_batch` and the number of ``texts`` it cut to ``max_length`` ids
        (``<start>`` and ``<end>`` included), in one pass over the texts.

        Example:
            >>> enc = WordTokenizer().fit(["a b c"]).encode_counted(["a b c", "a"], 4)
            >>> enc.ids.shape, enc.truncated
            ((2, 4), 1)
        """
        _check_int("max_length", max_length, 2)
        rows = [self.encode(text) for text in texts]
        out = np.full((len(rows), max_length), self.pad_id, dtype=np.int32)
        truncated = 0
        for i, row in enumerate(rows):
            if len(row) > max_length:
                row = row[: max_length - 1] + [self.end_id]
                truncated += 1
            out[i, : len(row)] = row
        return Encoded(out, truncated)

    # -------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict with ``kind``, all constructor options and ``vocab``."""
        self._require_fitted()
        return {"kind": self.kind, **self.options, "vocab": list(self._vocab)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from :meth:`to_dict` output, dispatching on ``data["kind"]``."""
        if not isinstance(data, Mapping):
            raise TypeError(f"tokenizer data must be a mapping, got {type(data).__name__}")
        if "kind" not in data:
            raise ValueError("missing key 'kind'")
        sub = cls._class_for(data["kind"], key="kind")
        if cls not in sub.__mro__:
            raise ValueError(f"key 'kind': {data['kind']!r} is not a {cls.__name__}")
        return sub._from_fields(data)

    @classmethod
    def _option_names(cls) -> tuple[str, ...]:
        params = inspect.signature(cls.__init__).parameters
        return tuple(name for name in params if name != "self")

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> Tokenizer:
        names = cls._option_names()
        expected = ("kind", *names, "vocab")
        for key in expected:
            if key not in data:
                raise ValueError(f"missing key {key!r}")
        for key in data:
            if key not in expected:
                raise ValueError(f"unexpected key {key!r}")
        try:
            tok = cls(**{name: data[name] for name in names})
        except TypeError as err:
            raise ValueError(f"bad option value: {err}") from err
        tok._set_vocab(tok._check_vocab(data["vocab"]))
        return tok

    def _check_vocab(self, vocab: Any) -> list[str]:
        if not isinstance(vocab, list) or not all(isinstance(t, str) and t for t in vocab):
            raise ValueError("key 'vocab' must be a list of non-empty strings")
        if tuple(vocab[: len(self.special_tokens)]) != self.special_tokens:
            raise ValueError(f"key 'vocab' must start with {list(self.special_tokens)}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("key 'vocab' contains duplicate tokens")
        return vocab

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as UTF-8 JSON (indent 2) to ``path``, atomically."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        atomic_write_text(path, text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer saved with :meth:`save`; bad content raises ``ValueError``."""
        name = os.fspath(path)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{name}: invalid JSON: {err}") from err
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: invalid tokenizer file: {err}") from err

    # -------------------------------------------------------------------- factory
    @staticmethod
    def _registry() -> dict[str, type[Tokenizer]]:
        return {sub.kind: sub for sub in (WordTokenizer, SmilesTokenizer, CharTokenizer,
                                          SelfiesTokenizer)}

    @classmethod
    def kinds(cls) -> tuple[str, ...]:
        """Valid values of ``kind`` for :meth:`create`."""
        return tuple(cls._registry())

    @classmethod
    def _class_for(cls, kind: Any, key: str = "kind") -> type[Tokenizer]:
        registry = cls._registry()
        if not isinstance(kind, str) or kind not in registry:
            valid = ", ".join(repr(k) for k in registry)
            raise ValueError(f"{key} {kind!r} is not a tokenizer kind; valid kinds: {valid}")
        return registry[kind]

    @classmethod
    def create(cls, kind: str, **options: Any) -> Tokenizer:
        """Unfitted tokenizer of ``kind`` (``"word"``, ``"smiles"``, ``"char"`` or
        ``"selfies"``)."""
        return cls._class_for(kind)(**options)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        sep = ", " if opts else ""
        return f"{type(self).__name__}({opts}{sep}vocab_size={self.vocab_size})"


class WordTokenizer(Tokenizer):
    """Whitespace word tokenizer with optional lower-casing and punctuation stripping.

    Punctuation is any character of Unicode category ``P*``; it is replaced by a space.
    ``max_vocab`` caps the vocabulary size *including* the 4 special tokens, and tokens
    seen fewer than ``min_count`` times are dropped.

    Example:
        >>> tok = WordTokenizer(max_vocab=6).fit(["A cat.", "a dog", "a cat"])
        >>> tok.vocab
        ['<pad>', '<start>', '<end>', '<unk>', 'a', 'cat']
        >>> tok.decode(tok.encode("A dog!"))
        'a <unk>'
    """

    kind = "word"
    joiner = " "

    def __init__(
        self,
        lower: bool = True,
        strip_punctuation: bool = True,
        max_vocab: int | None = None,
        min_count: int = 1,
    ) -> None:
        super().__init__()
        self.lower = _check_bool("lower", lower)
        self.strip_punctuation = _check_bool("strip_punctuation", strip_punctuation)
        minimum = len(self.special_tokens)
        self.max_vocab = None if max_vocab is None else _check_int("max_vocab", max_vocab, minimum)
        self.min_count = _check_int("min_count", min_count, 1)

    @property
    def options(self) -> dict[str, Any]:
        return {
            "lower": self.lower,
            "strip_punctuation": self.strip_punctuation,
            "max_vocab": self.max_vocab,
            "min_count": self.min_count,
        }

    def tokenize(self, text: str) -> list[str]:
        if self.lower:
            text = text.lower()
        if self.strip_punctuation:
            text = "".join(" " if unicodedata.category(c)[0] == "P" else c for c in text)
        return text.split()

    def _select(self, ranked: list[tuple[str, int]]) -> list[str]:
        kept = [tok for tok, count in ranked if count >= self.min_count]
        if self.max_vocab is not None:
            kept = kept[: self.max_vocab - len(self.special_tokens)]
        return kept

    def _check_vocab(self, vocab: Any) -> list[str]:
        vocab = super()._check_vocab(vocab)
        if self.max_vocab is not None and len(vocab) > self.max_vocab:
            raise ValueError(f"key 'vocab' has {len(vocab)} tokens > max_vocab={self.max_vocab}")
        return vocab


class SmilesTokenizer(Tokenizer):
    """Atom-level SMILES tokenizer (regex of the Molecular Transformer, Schwaller et al. 2019).

    ``''.join(tokenize(s)) == s`` always holds; characters the regex cannot cover raise
    ``ValueError`` naming the SMILES and the offending position.

    Example:
        >>> SmilesTokenizer().tokenize("Br/C=C\\\\Cl")
        ['Br', '/', 'C', '=', 'C', '\\\\', 'Cl']
        >>> tok = SmilesTokenizer().fit(["CCO", "[Na+].[Cl-]"])
        >>> tok.decode(tok.encode("OCC"))
        'OCC'
    """

    kind = "smiles"
    pattern: ClassVar[re.Pattern[str]] = re.compile(
        r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>|\*|\$"
        r"|\%[0-9]{2}|[0-9])"
    )

    @property
    def options(self) -> dict[str, Any]:
        return {}

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        pos = 0
        while pos < len(text):
            match = self.pattern.match(text, pos)
            if match is None:
                raise ValueError(
                    f"cannot tokenize SMILES {text!r}: unexpected character "
                    f"{text[pos]!r} at position {pos}"
                )
            tokens.append(match.group())
            pos = match.end()
        return tokens

    def validate(self, smiles: str) -> None:
        """Raise ``ValueError`` if ``smiles`` cannot be fully tokenized."""
        self.tokenize(smiles)


class CharTokenizer(Tokenizer):
    """One token per character, with optional lower-casing.

    Example:
        >>> tok = CharTokenizer().fit(["abba"])
        >>> tok.vocab[4:]
        ['a', 'b']
        >>> tok.decode(tok.encode("abc"))
        'ab<unk>'
    """

    kind = "char"

    def __init__(self, lower: bool = False) -> None:
        super().__init__()
        self.lower = _check_bool("lower", lower)

    @property
    def options(self) -> dict[str, Any]:
        return {"lower": self.lower}

    def tokenize(self, text: str) -> list[str]:
        return list(text.lower() if self.lower else text)


def _selfies() -> Any:
    try:
        import selfies
    except ImportError as exc:
        raise ImportError("tokenizer kind 'selfies' needs the selfies package: "
                          "pip install selfies") from exc
    return selfies


def _encoder_reason(err: Exception) -> str:
    """One line from a ``selfies.EncoderError``: its first line, then the bracketed
    constraint violations it lists, if any (the SMILES itself is named by the caller)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    details = [line.strip("[]") for line in lines[1:] if line.startswith("[")]
    return lines[0] + (f" ({'; '.join(details)})" if details else "") if lines else repr(err)


@functools.lru_cache(maxsize=1 << 17)
def _encode_selfies(smiles: str) -> str:
    """The SELFIES string of ``smiles`` (``""`` for ``""``); ``ValueError`` naming it if the
    selfies encoder refuses it. The encoder takes 0.1-0.3 ms a molecule, so the last
    131,072 results are kept (26 MB for QM9 molecules, 41 MB for ZINC ones): fitting,
    counting truncations and encoding a training set up to that size encode each text
    once, not once per pass (a larger set, read in order, finds none of its texts kept)."""
    if not smiles:
        return ""
    sf = _selfies()
    try:
        return sf.encoder(smiles)
    except sf.EncoderError as err:
        raise ValueError(f"cannot encode SMILES {smiles!r} as SELFIES: "
                         f"{_encoder_reason(err)}") from None


class SelfiesTokenizer(Tokenizer):
    """SMILES in and out, SELFIES symbols as tokens (Krenn et al. 2020, ``selfies`` package).

    :meth:`tokenize` encodes a SMILES with ``selfies.encoder`` and splits the result into
    symbols (``[C]``, ``[=O]``, ``[Branch1]``, ``[Ring1]``, ``.``); :meth:`decode` joins the
    symbols of the ids and turns them back into SMILES with ``selfies.decoder``. Any id
    sequence decodes: to ``""`` when it holds no atom symbol (an empty sequence, or only
    ring, branch and ``.`` symbols), else to a molecule within SELFIES' bond limits. Those
    limits are real valences for H, B, C, N, O, F, P, S, Cl, Br, I and their usual charges
    (see ``selfies.get_semantic_constraints()``), so such symbols always give molecules
    RDKit accepts; other atoms (``[Na+1]``, ``[Cl-1]``, metals) may take up to 8 bonds,
    and ``[Cl-1][C]`` decodes to ``[Cl-1]C``, which RDKit rejects. Special tokens
    (``<unk>`` included) are not SELFIES symbols and are left out.

    With ``canonical`` (the default, needs RDKit) the decoded SMILES is RDKit's canonical
    SMILES, as the molecule manifests and metrics write them (the decoder's spelling when
    RDKit rejects it); without it, the decoder's own spelling (kekulé, ``[NH1]``,
    ``[O-1]``). A SMILES the encoder refuses (an atom over its bond limit, a ``*``
    wildcard, ...) raises ``ValueError`` naming it. :attr:`joiner` joins symbols into a
    SELFIES string, not SMILES.

    Example:
        >>> tok = SelfiesTokenizer().fit(["CCO", "c1ccccc1O"])
        >>> tok.tokenize("OCC")
        ['[O]', '[C]', '[C]']
        >>> tok.vocab[4:]
        ['[C]', '[=C]', '[O]', '[=Branch1]', '[Ring1]']
        >>> tok.decode(tok.encode("C1=CC=CC=C1O"))
        'Oc1ccccc1'
        >>> tok.detokenize(["[F]", "[F]", "[F]"]), tok.detokenize(["[Ring1]"])  # F: 1 bond
        ('FF', '')
        >>> raw = SelfiesTokenizer(canonical=False).fit(["C[O-]"])
        >>> raw.decode(raw.encode("C[O-]"))
        'C[O-1]'
        >>> tok.tokenize("CS(=O)(=O)(=O)C")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: cannot encode SMILES 'CS(=O)(=O)(=O)C' as SELFIES: ... (S with 8 bond(s) ...)
    """

    kind = "selfies"

    def __init__(self, canonical: bool = True) -> None:
        super().__init__()
        self.canonical = _check_bool("canonical", canonical)
        _selfies()  # fail now, not at the first text, if a package is missing
        if self.canonical:
            chem()

    @property
    def options(self) -> dict[str, Any]:
        return {"canonical": self.canonical}

    def tokenize(self, text: str) -> list[str]:
        return list(_selfies().split_selfies(_encode_selfies(text)))

    def validate(self, smiles: str) -> None:
        """Raise ``ValueError`` if ``smiles`` cannot be encoded as SELFIES."""
        _encode_selfies(smiles)

    def detokenize(self, tokens: list[str]) -> str:
        """SMILES of the SELFIES symbols ``tokens`` (special tokens left out)."""
        sf = _selfies()
        selfies = "".join(t for t in tokens if t not in self.special_tokens)
        try:
            smiles = sf.decoder(selfies)
        except sf.DecoderError as err:
            raise ValueError(f"cannot decode SELFIES {selfies!r}: "
                             f"{str(err).splitlines()[0]}") from None
        if self.canonical and smiles:
            return canonical_smiles(smiles) or smiles
        return smiles

    def _check_vocab(self, vocab: Any) -> list[str]:
        vocab = super()._check_vocab(vocab)
        sf = _selfies()
        for token in vocab[len(self.special_tokens):]:
            try:  # split_selfies(".") is [], yet "." is a symbol (between molecules)
                ok = token == "." or list(sf.split_selfies(token)) == [token]
                sf.decoder(token)
            except sf.DecoderError:
                ok = False
            if not ok:
                raise ValueError(f"key 'vocab': {token!r} is not a SELFIES symbol")
        return vocab
