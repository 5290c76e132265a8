"""Readers for public captioning datasets, all returning ``list[Record]``.

One record per image-caption pair: the references of one image are several records with
the same ``image`` path (grouped later by :func:`captioner.data.build_split`). Missing
image files are *not* checked here (the loader lists them with their paths), except by
:func:`drop_missing` / ``read_flickr_token(only_existing=True)``.

Formats (:func:`read_any`):

=============  ===========================================================================
csv            generic manifest (:func:`captioner.data.read_csv_manifest`)
jsonl          one JSON object per line (:func:`read_jsonl`)
coco           COCO captions JSON, e.g. ``captions_val2014.json`` (:func:`read_coco`)
karpathy       Karpathy split JSON, e.g. ``dataset_flickr8k.json`` (:func:`read_karpathy`)
flickr8k       official ``Flickr8k.token.txt`` + split files (:func:`read_flickr_token`)
captions_csv   Kaggle ``captions.txt`` (``image,caption``) (:func:`read_captions_csv`)
auto           sniffed from the file (:func:`detect_format`)
smiles         a CSV of SMILES without pictures, drawn while training (:func:`read_smiles_list`)
=============  ===========================================================================

:func:`group_splits` assigns splits by group (image path, or canonical SMILES with
:func:`canonical_smiles_key`) so that no image or molecule lands in two splits.
"""

from __future__ import annotations

import json
import operator
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from captioner.choices import Choices
from captioner.config import DataConfig
from captioner.data.chem import canonical_smiles, chem, parse, quiet_rdkit
from captioner.data.manifests import (
    DataError,
    Record,
    csv_rows,
    normalise_split,
    read_csv_manifest,
    read_text,
)
from captioner.data.shapes import generate_shapes
from captioner.data.tokenizers import SelfiesTokenizer, SmilesTokenizer

PathLike = str | Path


@dataclass(frozen=True)
class DatasetFormats:
    """The formats :func:`read_any` accepts and how Flickr8k files are recognised.

    ``flickr8k_split_files`` pairs each split with its official list file (next to the
    token file); ``token_line`` matches the ``<image>#<k><TAB>`` start of a token line.

    Example:
        >>> DatasetFormats().formats()
        ('csv', 'jsonl', 'coco', 'karpathy', 'flickr8k', 'captions_csv', 'auto', 'smiles')
        >>> DatasetFormats().flickr8k_split_files[0]
        ('train', 'Flickr_8k.trainImages.txt')
    """

    flickr8k_split_files: tuple[tuple[str, str], ...] = (
        ("train", "Flickr_8k.trainImages.txt"),
        ("val", "Flickr_8k.devImages.txt"),
        ("test", "Flickr_8k.testImages.txt"))
    token_line: re.Pattern[str] = re.compile(r"^\S+#\d+\t")

    def formats(self) -> tuple[str, ...]:
        """``data.format`` values that name a file format (all but the generated
        ``shapes``)."""
        return tuple(f for f in Choices().data_format if f != "shapes")


class ReadResult(NamedTuple):
    """Records kept, and the image paths (sorted, unique) dropped because the file is missing.

    Example:
        >>> records, dropped = ReadResult([Record("a.jpg", "a dog")], ("b.jpg",))
        >>> len(records), ReadResult([], dropped).num_dropped
        (1, 1)
    """

    records: list[Record]
    dropped: tuple[str, ...] = ()

    @property
    def num_dropped(self) -> int:
        return len(self.dropped)


# ---- helpers -----------------------------------------------------------------------------
def _split_name(value: Any, where: str) -> str | None:
    """Normalise a split name (train/restval, val/valid/validation/dev, test) or None."""
    if value is None or value == "":
        return None
    try:
        return normalise_split(str(value), Path(where), 0)
    except DataError:
        raise DataError(f"{where}: unknown split {value!r} (use train, val or test)") from None


def _resolve(name: str, base: Path) -> str:
    p = Path(name).expanduser()
    return str(p if p.is_absolute() else base / p)


def _clean(text: Any) -> str:
    """Caption text with runs of whitespace (COCO has embedded newlines) collapsed."""
    return " ".join(text.split()) if isinstance(text, str) else ""


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        return json.loads(read_text(path, "utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None


def _first_dir(candidates: Iterable[Path]) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def drop_missing(records: list[Record]) -> ReadResult:
    """Keep the records whose image file exists; report the missing image paths.

    Example:
        >>> drop_missing([Record("/no/such.jpg", "a dog")])
        ReadResult(records=[], dropped=('/no/such.jpg',))
    """
    exists: dict[str, bool] = {}
    for r in records:
        if r.image not in exists:
            exists[r.image] = Path(r.image).is_file()
    kept = [r for r in records if exists[r.image]]
    return ReadResult(kept, tuple(sorted(p for p, ok in exists.items() if not ok)))


# ---- COCO --------------------------------------------------------------------------------
def coco_split_from_name(path: PathLike) -> str | None:
    """The split named in a COCO annotation file name, else None.

    Example:
        >>> coco_split_from_name("annotations/captions_val2014.json")
        'val'
        >>> coco_split_from_name("captions_train2017.json"), coco_split_from_name("c.json")
        ('train', None)
    """
    for part in re.split(r"[_.\-\s]+", Path(path).stem.lower()):
        name = part.rstrip("0123456789")
        if name in ("train", "restval", "val", "valid", "validation", "dev", "test"):
            return _split_name(name, str(path))
    return None


def coco_image_dirs(annotations_json: PathLike) -> list[Path]:
    """Candidate image folders for a COCO annotation file, in the order tried.

    ``root`` is the JSON's folder, or its parent when that folder is ``annotations``;
    ``tag`` is the file name after ``captions_`` (``val2014``). Tried: ``root/tag``,
    ``root/images/tag``, ``root/images``.

    Example:
        >>> [p.as_posix() for p in coco_image_dirs("/c/annotations/captions_val2014.json")]
        ['/c/val2014', '/c/images/val2014', '/c/images']
    """
    path = Path(annotations_json)
    root = path.parent.parent if path.parent.name == "annotations" else path.parent
    tag = re.sub(r"^captions_", "", path.stem)
    return [root / tag, root / "images" / tag, root / "images"]


def _coco_images_dir(path: Path, file_names: list[str]) -> Path:
    """The first candidate folder holding one of the images, else the first existing one."""
    candidates = coco_image_dirs(path)
    for folder in candidates:
        if folder.is_dir() and any((folder / f).is_file() for f in file_names):
            return folder
    found = _first_dir(candidates)
    if found is None:
        tried = ", ".join(str(c) for c in candidates)
        raise DataError(f"{path}: cannot find the images folder (tried {tried}); "
                        "pass images_dir")
    return found


def _coco_images(doc: dict[str, Any], path: Path) -> dict[Any, str]:
    names: dict[Any, str] = {}
    for i, img in enumerate(doc.get("images") or []):
        if not isinstance(img, dict) or "id" not in img or not img.get("file_name"):
            raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        names[img["id"]] = str(img["file_name"])
    return names


def _coco_from_doc(doc: Any, path: Path, images_dir: PathLike | None,
                   split: str | None) -> list[Record]:
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise DataError(f"{path}: not a COCO captions file (no 'annotations' list)")
    names = _coco_images(doc, path)
    split = _split_name(split, str(path)) if split else coco_split_from_name(path)
    base = Path(images_dir) if images_dir else _coco_images_dir(path, list(names.values()))
    records = []
    for i, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotations[{i}]"
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in names:
            raise DataError(f"{where}: image_id {image_id!r} is not in 'images'")
        text = _clean(ann.get("caption"))
        if not text:
            raise DataError(f"{where}: empty 'caption'")
        records.append(Record(_resolve(names[image_id], base), text, split,
                              {"image_id": image_id}, source=where))
    return records


def read_coco(annotations_json: PathLike | Sequence[PathLike], images_dir: PathLike | None = None,
              split: str | None = None) -> list[Record]:
    """Read COCO captions JSON file(s): ``{"images": [{"id", "file_name"}], "annotations":
    [{"image_id", "caption"}]}``; several files are concatenated.

    Images resolve against ``images_dir``, else the first folder of
    :func:`coco_image_dirs` holding any listed image, else the first that exists, else
    ``DataError``. The split is ``split``, else the one in the file name
    (:func:`coco_split_from_name`), else None. ``meta`` holds the COCO ``image_id``.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "captions_val2014.json").write_text(json.dumps({
        ...     "images": [{"id": 7, "file_name": "a.jpg"}],
        ...     "annotations": [{"image_id": 7, "caption": "A dog. "}]}))
        >>> r = read_coco(d / "captions_val2014.json", images_dir="/im")[0]
        >>> r.image, r.text, r.split, r.meta
        ('/im/a.jpg', 'A dog.', 'val', {'image_id': 7})
    """
    if isinstance(annotations_json, (str, Path)):
        path = Path(annotations_json)
        return _coco_from_doc(_load_json(path), path, images_dir, split)
    return [r for p in annotations_json for r in read_coco(p, images_dir, split)]


# ---- Karpathy ----------------------------------------------------------------------------
def _karpathy_text(sentence: Any, where: str) -> str:
    if not isinstance(sentence, dict):
        raise DataError(f"{where}: expected an object with 'raw'")
    text = _clean(sentence.get("raw"))
    if not text and isinstance(sentence.get("tokens"), list):
        text = " ".join(str(t) for t in sentence["tokens"])
    if not text:
        raise DataError(f"{where}: empty 'raw' and 'tokens'")
    return text


def _karpathy_image(img: Any, i: int, path: Path, base: Path) -> list[Record]:
    where = f"{path}: images[{i}]"
    if not isinstance(img, dict) or not img.get("filename"):
        raise DataError(f"{where}: no 'filename'")
    folder = base / img["filepath"] if img.get("filepath") else base
    image = _resolve(str(img["filename"]), folder)
    split = _split_name(img.get("split"), f"{where}.split")
    meta = {k: img[k] for k in ("imgid", "cocoid") if k in img}
    return [Record(image, _karpathy_text(s, f"{where}.sentences[{j}]"), split, dict(meta),
                   source=f"{where}.sentences[{j}]")
            for j, s in enumerate(img.get("sentences") or [])]


def _karpathy_from_doc(doc: Any, path: Path, images_dir: PathLike | None) -> list[Record]:
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{path}: not a Karpathy split file (no 'images' list)")
    base = Path(images_dir) if images_dir else _first_dir([path.parent / "images"])
    base = base or path.parent
    records = [r for i, img in enumerate(doc["images"])
               for r in _karpathy_image(img, i, path, base)]
    if not records:
        raise DataError(f"{path}: no sentences")
    return records


def read_karpathy(json_path: PathLike, images_dir: PathLike | None = None) -> list[Record]:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr8k.json``, ...).

    Text is each sentence's ``raw`` (whitespace collapsed; ``tokens`` joined if ``raw`` is
    empty), the split comes from the file (restval -> train). The image is
    ``images_dir/filepath/filename`` (``filepath`` only in COCO) where ``images_dir``
    defaults to ``<json folder>/images`` if it exists, else the JSON's folder. ``meta``
    holds ``imgid`` (and ``cocoid``).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "dataset_coco.json").write_text(json.dumps({"images": [
        ...     {"filepath": "val2014", "filename": "a.jpg", "split": "restval", "imgid": 0,
        ...      "sentences": [{"raw": "A cat .", "tokens": ["a", "cat"]}]}]}))
        >>> r = read_karpathy(d / "dataset_coco.json", images_dir="/coco")[0]
        >>> r.image, r.text, r.split, r.meta
        ('/coco/val2014/a.jpg', 'A cat .', 'train', {'imgid': 0})
    """
    path = Path(json_path)
    return _karpathy_from_doc(_load_json(path), path, images_dir)


# ---- Flickr8k token file -----------------------------------------------------------------
def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    return read_text(path, "utf-8-sig").splitlines()


def _flickr_images_dir(folder: Path) -> Path:
    return _first_dir([folder / "images", folder / "Flicker8k_Dataset"]) or folder


def _flickr_split_files(token: Path, split_files: dict[str, PathLike] | None
                        ) -> dict[str, Path]:
    if split_files is None:
        found = {s: token.parent / name
                 for s, name in DatasetFormats().flickr8k_split_files}
        return {s: p for s, p in found.items() if p.is_file()}
    files = {}
    for name, p in split_files.items():
        split = _split_name(name, f"split_files[{name!r}]")
        if split is None or not Path(p).is_file():
            raise DataError(f"split file for {name!r} not found: {p}")
        files[split] = Path(p)
    return files


def read_flickr_split_files(files: dict[str, Path]) -> dict[str, str]:
    """Image file name -> split, from official list files (one name per line).

    Example:
        >>> read_flickr_split_files({})
        {}
    """
    owner: dict[str, tuple[str, Path]] = {}
    for split, path in files.items():
        for line in _read_lines(path):
            name = line.strip()
            if not name:
                continue
            if name in owner and owner[name][0] != split:
                raise DataError(f"{path}: {name} is also listed in {owner[name][1]}")
            owner[name] = (split, path)
    return {name: split for name, (split, _) in owner.items()}


def _parse_token_line(line: str, path: Path, number: int) -> tuple[str, str]:
    if not DatasetFormats().token_line.match(line):
        raise DataError(f"{path}:{number}: expected '<image>#<k><TAB><caption>'")
    key, caption = line.split("\t", 1)
    text = _clean(caption)
    if not text:
        raise DataError(f"{path}:{number}: empty caption")
    return key.rsplit("#", 1)[0], text


def read_flickr_token(token_txt: PathLike, images_dir: PathLike | None = None,
                      split_files: dict[str, PathLike] | None = None,
                      only_existing: bool = False) -> ReadResult:
    """Read the official ``Flickr8k.token.txt`` (``<image>#<k><TAB><caption>``).

    ``images_dir`` defaults to ``<folder>/images``, else ``<folder>/Flicker8k_Dataset``,
    else the token file's folder. Splits come from ``split_files`` (``{"train": path,
    "dev": path, ...}``) or, when None, the official ``Flickr_8k.{train,dev,test}Images.txt``
    found beside the token file (dev -> val); unlisted images get split None.

    Returns a :class:`ReadResult`: with ``only_existing=True`` records whose image file is
    missing are dropped and their paths listed in ``dropped``; otherwise every record is
    kept and ``dropped`` is empty (the loader reports missing images later).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "Flickr8k.token.txt").write_text("a.jpg#0\\tA dog .\\na.jpg#1\\tA pup\\n")
        >>> _ = (d / "Flickr_8k.devImages.txt").write_text("a.jpg\\n")
        >>> records, dropped = read_flickr_token(d / "Flickr8k.token.txt", images_dir="/im")
        >>> [(r.image, r.text, r.split) for r in records], dropped
        ([('/im/a.jpg', 'A dog .', 'val'), ('/im/a.jpg', 'A pup', 'val')], ())
        >>> read_flickr_token(d / "Flickr8k.token.txt", only_existing=True).num_dropped
        1
    """
    path = Path(token_txt)
    lines = _read_lines(path)
    base = Path(images_dir) if images_dir else _flickr_images_dir(path.parent)
    splits = read_flickr_split_files(_flickr_split_files(path, split_files))
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            name, text = _parse_token_line(line, path, number)
            records.append(Record(_resolve(name, base), text, splits.get(name), {},
                                  source=f"{path}:{number}"))
    if not records:
        raise DataError(f"{path}: no captions")
    return drop_missing(records) if only_existing else ReadResult(records)


# ---- Kaggle captions.txt -----------------------------------------------------------------
def read_captions_csv(csv_path: PathLike, images_dir: PathLike | None = None) -> list[Record]:
    """Read the Kaggle ``captions.txt`` layout (header ``image,caption``, no split).

    ``images_dir`` defaults to ``<folder>/images``, else ``<folder>/Images``, else the
    file's folder.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "captions.txt").write_text('image,caption\\na.jpg,"A dog , wet ."\\n')
        >>> r = read_captions_csv(d / "captions.txt", images_dir="/im")[0]
        >>> r.image, r.text, r.split
        ('/im/a.jpg', 'A dog , wet .', None)
    """
    path = Path(csv_path)
    base = images_dir or _first_dir([path.parent / "images", path.parent / "Images"])
    return read_csv_manifest(path, "image", "caption", None, str(base) if base else None)


# ---- JSONL -------------------------------------------------------------------------------
def _jsonl_texts(value: Any, where: str, key: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    texts = [_clean(v) for v in values]
    if not texts or not all(texts):
        raise DataError(f"{where}: {key!r} must be a non-empty string or list of strings")
    return texts


def _jsonl_row(row: Any, where: str, keys: tuple[str, str, str], base: Path) -> list[Record]:
    image_key, text_key, split_key = keys
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    image = row.get(image_key)
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: missing or empty {image_key!r}")
    texts = _jsonl_texts(row.get(text_key), where, text_key)
    split = _split_name(row.get(split_key), where) if split_key else None
    meta = {k: v for k, v in row.items() if k not in keys}
    return [Record(_resolve(image, base), t, split, dict(meta), source=where) for t in texts]


def read_jsonl(path: PathLike, image_key: str = "image", text_key: str = "caption",
               split_key: str | None = "split", images_dir: PathLike | None = None
               ) -> list[Record]:
    """Read one JSON object per line (blank lines skipped); other keys go to ``meta``.

    The text may be a list of strings (several references -> several records). Relative
    image paths resolve against ``images_dir`` or the file's folder.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "m.jsonl").write_text('{"image": "a.png", "caption": ["x y", "z"], '
        ...                                '"split": "dev", "id": 3}\\n')
        >>> [(Path(r.image).name, r.text, r.split, r.meta) for r in read_jsonl(d / "m.jsonl")]
        [('a.png', 'x y', 'val', {'id': 3}), ('a.png', 'z', 'val', {'id': 3})]
    """
    path = Path(path)
    base = Path(images_dir) if images_dir else path.parent
    keys = (image_key, text_key, split_key or "")
    records = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
        records.extend(_jsonl_row(row, f"{path}:{number}", keys, base))
    if not records:
        raise DataError(f"{path}: no rows")
    return records


# ---- dispatch ----------------------------------------------------------------------------
def _first_line(path: Path) -> str:
    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        return fh.readline().rstrip("\r\n")


def _json_format(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("annotations"), list):
        return "coco"
    images = doc.get("images")
    if isinstance(images, list) and images and isinstance(images[0], dict) \
            and "sentences" in images[0]:
        return "karpathy"
    return None


def _text_format(path: Path) -> str | None:
    first = _first_line(path)
    if path.suffix.lower() == ".txt" and DatasetFormats().token_line.match(first):
        return "flickr8k"
    if first.strip().replace(" ", "") == "image,caption":
        return "captions_csv"
    return "csv" if path.suffix.lower() == ".csv" else None


def _unknown(path: Path, why: str) -> DataError:
    names = ", ".join(f for f in DatasetFormats().formats() if f != "auto")
    return DataError(f"{path}: cannot detect the format ({why}); pass one of: {names}")


def detect_format(path: PathLike) -> str:
    """Sniff a file's format: ``.jsonl`` -> jsonl; ``.json`` with ``annotations`` -> coco,
    with ``images[*].sentences`` -> karpathy; ``.txt`` starting ``<image>#<k><TAB>`` ->
    flickr8k; ``.txt``/``.csv`` with header ``image,caption`` -> captions_csv; other
    ``.csv`` -> csv.

    Example:
        >>> detect_format("manifest.jsonl")
        'jsonl'
    """
    return _detect(Path(path))[0]


def _detect(path: Path) -> tuple[str, Any]:
    """(format, parsed JSON document or None) so JSON files are parsed only once."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl", None
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    if suffix == ".json":
        doc = _load_json(path)
        fmt = _json_format(doc)
        if fmt is None:
            raise _unknown(path, "JSON without 'annotations' or 'images[*].sentences'")
        return fmt, doc
    fmt = _text_format(path) if suffix in (".txt", ".csv") else None
    if fmt is None:
        raise _unknown(path, f"unrecognised {suffix or 'extension-less'} file")
    return fmt, None


def read_any(fmt: str, path: PathLike | Sequence[PathLike], images_dir: PathLike | None = None,
             image_column: str = "image", text_column: str = "caption",
             split_column: str | None = "split") -> list[Record]:
    """Read ``path`` (or several paths, concatenated) in format ``fmt`` (see
    :class:`DatasetFormats`).

    The column arguments apply to ``csv`` and ``jsonl``; ``flickr8k`` keeps all records
    (use :func:`drop_missing` to drop those without an image file).

    Example:
        >>> read_any("xml", "a.xml")
        Traceback (most recent call last):
        captioner.data.manifests.DataError: unknown format 'xml'; use one of: csv, jsonl, coco, ...
    """
    formats = DatasetFormats().formats()
    if fmt not in formats:
        raise DataError(f"unknown format {fmt!r}; use one of: {', '.join(formats)}")
    if not isinstance(path, (str, Path)):
        return [r for p in path for r in read_any(fmt, p, images_dir, image_column,
                                                   text_column, split_column)]
    path = Path(path)
    doc = None
    if fmt == "auto":
        fmt, doc = _detect(path)
    readers: dict[str, Callable[[], list[Record]]] = {
        "csv": lambda: read_csv_manifest(path, image_column, text_column, split_column,
                                         str(images_dir) if images_dir else None),
        "jsonl": lambda: read_jsonl(path, image_column, text_column, split_column, images_dir),
        "coco": lambda: (read_coco(path, images_dir) if doc is None
                         else _coco_from_doc(doc, path, images_dir, None)),
        "karpathy": lambda: (read_karpathy(path, images_dir) if doc is None
                             else _karpathy_from_doc(doc, path, images_dir)),
        "flickr8k": lambda: read_flickr_token(path, images_dir).records,
        "captions_csv": lambda: read_captions_csv(path, images_dir),
        "smiles": lambda: read_smiles_list(path, text_column, split_column),
    }
    return readers[fmt]()


def read_smiles_list(path: PathLike, column: str = "smiles", split_column: str | None = None
                     ) -> list[Record]:
    """Molecules without pictures (``data.format: smiles``): one record per row of a CSV
    whose ``column`` holds SMILES, its text the RDKit canonical SMILES and its image
    empty (training draws it). A SMILES RDKit cannot parse is a :class:`DataError`
    naming the file and line, after counting all such rows.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "m.csv"
        >>> _ = p.write_text("smiles\\nOCC\\nc1ccccc1\\n")
        >>> [(r.text, r.source.endswith("m.csv:2")) for r in read_smiles_list(p)][:1]
        [('CCO', True)]
    """
    path = Path(path)
    rows = [(line, (row[column] or "").strip(), row.get(split_column or ""))
            for line, row in csv_rows(path, [column], "; set data.text_column")]
    records, bad = [], []
    rd = chem()
    with quiet_rdkit():
        mols = [parse(smiles) if smiles else None for _, smiles, _ in rows]
        texts = [rd.MolToSmiles(m) if m is not None else None for m in mols]
    for (line, smiles, split_value), canonical in zip(rows, texts):
        where = f"{path}:{line}"
        if canonical is None:
            bad.append(f"{where}: {smiles!r}")
            continue
        split = _split_name(split_value, where) if split_column else None
        records.append(Record("", canonical, split, source=where))
    if bad:
        raise DataError(f"{len(bad)} SMILES that RDKit cannot parse, first "
                        f"{'; '.join(bad[:3])}")
    if not records:
        raise DataError(f"{path}: no SMILES rows")
    return records


# ---- splits ------------------------------------------------------------------------------
def canonical_smiles_key(record: Record) -> str:
    """Group key for molecules: RDKit canonical SMILES of the text, else the raw text.

    Example:
        >>> canonical_smiles_key(Record("a.png", "OCC")), canonical_smiles_key(Record("b", "C1C"))
        ('CCO', 'C1C')
    """
    text = record.text.strip()
    try:
        return canonical_smiles(text) or text
    except ImportError:  # RDKit not installed: group by the raw string
        return text


def _group(records: list[Record], key: Callable[[Record], str]
           ) -> tuple[list[str], dict[str, str | None]]:
    """Keys in first-seen order, and each group's explicit split (None if it has none)."""
    keys = [key(r) for r in records]
    explicit: dict[str, str | None] = {}
    for k, r in zip(keys, records):
        have = explicit.get(k)
        if r.split is not None and have is not None and have != r.split:
            raise DataError(f"group {k!r} has records in both {have!r} and {r.split!r}")
        explicit[k] = r.split if r.split is not None else have
    return keys, explicit


def group_splits(records: list[Record], val_fraction: float, test_fraction: float,
                 seed: int = 0, key: Callable[[Record], str] | None = None) -> list[Record]:
    """Give records without a split one, by group (``key(record)``, default the image
    path), so that no group crosses splits. Returns a new list; records given a split are
    copies (the input is unchanged).

    Groups with an explicit split keep it (their records without one join it; conflicting
    explicit splits raise ``DataError``). The other groups are sorted, shuffled with
    ``seed`` and ``round(n * val_fraction)`` go to val, ``round(n * test_fraction)`` to
    test (at most the groups val leaves: fractions summing to 1 can round past ``n``), the
    rest to train -- for records without explicit splits and the default key the same as
    splitting by image.

    Example:
        >>> recs = [Record("a", "OCC"), Record("b", "CCO"), Record("c", "CCN"),
        ...         Record("d", "N", "test")]
        >>> [r.split for r in group_splits(recs, 0.5, 0.0, key=canonical_smiles_key)]
        ['train', 'train', 'val', 'test']
    """
    if min(val_fraction, test_fraction) < 0 or val_fraction + test_fraction > 1:
        raise ValueError(f"bad fractions val={val_fraction}, test={test_fraction}")
    keys, explicit = _group(records, key or (lambda r: r.image))
    free = sorted(k for k, s in explicit.items() if s is None)
    random.Random(seed).shuffle(free)
    n_val = round(len(free) * val_fraction)
    n_test = min(round(len(free) * test_fraction), len(free) - n_val)
    chosen = {k: "val" for k in free[:n_val]}
    chosen.update({k: "test" for k in free[n_val:n_val + n_test]})
    return [r if r.split is not None else replace(r, split=explicit[k] or chosen.get(k, "train"))
            for k, r in zip(keys, records)]


def check_smiles(records: Sequence[Record], kind: str = "smiles") -> None:
    """Raise :class:`DataError` at the first text the SMILES tokenizer cannot split,
    naming where it was read (file:line) and the character.

    Example:
        >>> check_smiles([Record("a.png", "CCO", source="m.csv:2"),
        ...               Record("b.png", "C&C", source="m.csv:3")])
        Traceback (most recent call last):
        ...
        captioner.data.manifests.DataError: m.csv:3: cannot tokenize SMILES 'C&C': ... position 1
    """
    tokenizer = SelfiesTokenizer(canonical=False) if kind == "selfies" else SmilesTokenizer()
    for i, r in enumerate(records):
        try:
            tokenizer.validate(r.text)
        except ValueError as exc:
            raise DataError(f"{r.source or f'record {i} ({r.image})'}: {exc}") from None


def read_records(cfg: DataConfig, smiles_targets: bool = False, kind: str = "smiles"
                 ) -> list[Record]:
    """All records of the configured data source, each with a split.

    With ``smiles_targets`` every text must split into SMILES tokens, else
    :class:`DataError` names the record's file and line (:func:`check_smiles`).
    Splits are by image; with ``data.split_by: smiles`` (or ``auto`` and SMILES targets)
    by canonical SMILES, so no molecule lands in two splits.
    """
    if cfg.format == "shapes":
        s = cfg.shapes
        manifest = generate_shapes(cfg.path or "runs/data/shapes", s.n_images, s.image_size,
                                   s.min_objects, s.max_objects, s.seed, s.val_fraction,
                                   s.test_fraction)
        records = read_csv_manifest(manifest)
    else:
        if not cfg.path:
            raise DataError("data.path is empty: name a manifest, caption file or annotations")
        records = read_any(cfg.format, cfg.path, cfg.images_dir, cfg.image_column,
                           cfg.text_column, cfg.split_column)
    if smiles_targets:
        check_smiles(records, kind)
    drawn = cfg.format == "smiles"  # no image files: the molecules are drawn
    if cfg.only_existing and not drawn:
        records = drop_missing(records).records
    if cfg.limit and drawn:
        records = records[: cfg.limit]
    elif cfg.limit:
        keep = set(sorted({r.image for r in records})[: cfg.limit])
        records = [r for r in records if r.image in keep]
    by_smiles = cfg.split_by == "smiles" or (cfg.split_by == "auto" and smiles_targets)
    key = canonical_smiles_key if by_smiles else None
    if drawn:  # the texts are canonical SMILES already
        key = operator.attrgetter("text")
    return group_splits(records, cfg.val_fraction, cfg.test_fraction, cfg.split_seed, key=key)

