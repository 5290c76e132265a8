"""Manifests: image-text records, the errors that name the file and line, and the
report of images that could not be used."""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A manifest or image problem, with the file (and line) that caused it."""


@dataclass
class Record:
    """One image-text pair as read from a manifest.

    Example:
        >>> Record(image="/data/a.png", text="a red circle").meta
        {}
    """

    image: str
    text: str
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: where the record was read (``file:line``, or ``file: annotations[i]``), for errors
    source: str | None = field(default=None, compare=False, repr=False)


@dataclass
class LoadReport:
    """Images that could not be used, with reasons; written into the run directory.

    Example:
        >>> r = LoadReport(); r.add("x.jpg", "missing file"); r.count
        1
    """

    failures: list[tuple[str, str]] = field(default_factory=list)
    #: training texts longer than ``data.max_length`` tokens (cut to it), of ``texts``
    truncated: int = 0
    texts: int = 0

    def add(self, path: str, reason: str) -> None:
        self.failures.append((path, reason))

    @property
    def count(self) -> int:
        return len(self.failures)

    def write(self, path: str | Path) -> None:
        lines = [f"{p}\t{reason}" for p, reason in self.failures]
        Path(path).write_text("".join(line + "\n" for line in lines))


# ---- manifests ---------------------------------------------------------------------------
def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """The text of ``path``; bytes that are not UTF-8 raise :class:`DataError` naming the
    file, the line and the byte offset (not a bare UnicodeDecodeError).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "m.csv"
        >>> _ = p.write_bytes(b"image,caption\\na.png,caf\\xe9\\n")
        >>> read_text(p)
        Traceback (most recent call last):
        ...
        captioner.data.manifests.DataError: ...m.csv:2: not UTF-8 text (byte 0xe9 at offset 23)...
    """
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                        f"offset {exc.start}); save the file as UTF-8") from None


def _resolve_image(name: str, base: Path) -> str:
    p = Path(name).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _parse_meta(row: dict[str, str], used: set[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in row.items():
        if key in used or key is None:
            continue
        if value and value[:1] in "[{":
            try:
                meta[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
        meta[key] = value
    return meta


def csv_rows(path: str | Path, columns: Sequence[str], hint: str = "",
             limit: int | None = None) -> list[tuple[int, dict[str, str]]]:
    """``(line, row)`` of the data rows of a UTF-8 CSV, the first ``limit`` only when given
    (the file is read no further; a byte-order mark is allowed; the header is line 1, a
    quoted field spanning lines counts its lines). A header without one of ``columns`` is
    a :class:`DataError` naming the file, the column, the columns found and ``hint``;
    bytes that are not UTF-8 one naming the line (:func:`read_text`).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "m.csv"
        >>> _ = p.write_text("\\ufeffid,smiles\\n1,CCO\\n2,c1ccccc1\\n")
        >>> csv_rows(p, ["smiles"])
        [(2, {'id': '1', 'smiles': 'CCO'}), (3, {'id': '2', 'smiles': 'c1ccccc1'})]
        >>> csv_rows(p, ["smi"], "; set data.text_column")
        Traceback (most recent call last):
        ...
        captioner.data.manifests.DataError: ...: no column 'smi' (columns: id, smiles); set data...
    """
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            found = reader.fieldnames or []
            for col in columns:
                if col not in found:
                    raise DataError(f"{path}: no column {col!r} (columns: "
                                    f"{', '.join(found)}){hint}")
            return [(reader.line_num, row) for row in itertools.islice(reader, limit)]
    except UnicodeDecodeError:
        read_text(path, "utf-8-sig")  # raises the DataError naming the line and the byte
        raise


def read_csv_manifest(path: str | Path, image_column: str = "image", text_column: str = "caption",
                      split_column: str | None = "split", images_dir: str | None = None
                      ) -> list[Record]:
    """Read a CSV manifest; relative image paths resolve against ``images_dir`` or the
    manifest's own folder. Extra columns (JSON decoded where possible) go to ``meta``.

    Refused with :class:`DataError` naming the file (and line): a missing image or text
    column (the columns found are listed), a row with an empty image or caption (empty
    captions are refused, not skipped: a blank reference is a broken manifest), a file
    that is not UTF-8, an unknown split.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    base = Path(images_dir) if images_dir else path.parent
    rows = csv_rows(path, (image_column, text_column))
    has_split = bool(split_column) and bool(rows) and split_column in rows[0][1]
    used = {image_column, text_column, split_column or ""}
    records = []
    for line, row in rows:
        image, text = row.get(image_column), row.get(text_column)
        if not image or text is None or not text.strip():
            raise DataError(f"{path}:{line}: empty {image_column!r} or {text_column!r}")
        split = normalise_split(row.get(split_column), path, line) if has_split else None
        records.append(Record(_resolve_image(image, base), text.strip(), split,
                              _parse_meta(row, used), source=f"{path}:{line}"))
    if not records:
        raise DataError(f"{path}: no rows")
    return records


def normalise_split(value: str | None, path: Path, line: int) -> str | None:
    if not value:
        return None
    aliases = {"train": "train", "restval": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test"}
    split = aliases.get(value.strip().lower())
    if split is None:
        raise DataError(f"{path}:{line}: unknown split {value!r} (use train, val or test)")
    return split

