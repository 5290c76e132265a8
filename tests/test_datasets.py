"""Dataset readers (COCO, Karpathy, Flickr8k token, Kaggle captions.txt, JSONL), format
detection and group-wise splits."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from captioner.data.formats import (
    ReadResult,
    canonical_smiles_key,
    coco_split_from_name,
    detect_format,
    drop_missing,
    group_splits,
    read_any,
    read_captions_csv,
    read_coco,
    read_flickr_token,
    read_jsonl,
    read_karpathy,
)
from captioner.data.manifests import DataError, Record

FLICKR = Path("/work/shared/data/flickr8k")


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def triples(records: list[Record]) -> list[tuple[str, str, str | None]]:
    return [(r.image, r.text, r.split) for r in records]


# ---- COCO --------------------------------------------------------------------------------
def write_coco(path: Path, images: list[tuple[int, str]], anns: list[tuple[int, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "info": {}, "images": [{"id": i, "file_name": f, "width": 1} for i, f in images],
        "annotations": [{"id": k, "image_id": i, "caption": c}
                        for k, (i, c) in enumerate(anns)]}))
    return path


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "annotations" / "captions_val2014.json",
                      [(1, "a.jpg"), (2, "b.jpg"), (3, "unused.jpg")],
                      [(1, "A dog runs.\n"), (2, "  Two  cats"), (1, "A wet dog")])


def test_coco_resolves_split_folder_and_infers_split(coco: Path, tmp_path: Path) -> None:
    touch(tmp_path / "images" / "a.jpg")  # a decoy: <root>/val2014 is tried first
    touch(tmp_path / "val2014" / "a.jpg")
    im = tmp_path / "val2014"
    assert triples(read_coco(coco)) == [(str(im / "a.jpg"), "A dog runs.", "val"),
                                        (str(im / "b.jpg"), "Two cats", "val"),
                                        (str(im / "a.jpg"), "A wet dog", "val")]
    assert read_coco(coco)[1].meta == {"image_id": 2}


def test_coco_falls_back_to_images_folder_and_explicit_args(coco: Path, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    assert read_coco(coco)[0].image == str(tmp_path / "images" / "a.jpg")
    recs = read_coco(coco, images_dir="/data/coco", split="train")
    assert triples(recs)[0] == ("/data/coco/a.jpg", "A dog runs.", "train")


def test_coco_without_images_folder_is_a_clear_error(coco: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"captions_val2014\.json.*val2014.*images_dir"):
        read_coco(coco)


def test_coco_several_files_are_concatenated(coco: Path, tmp_path: Path) -> None:
    train = write_coco(tmp_path / "annotations" / "captions_train2014.json",
                       [(9, "t.jpg")], [(9, "A train")])
    recs = read_coco([train, coco], images_dir=tmp_path)
    assert [(Path(r.image).name, r.split) for r in recs] == [
        ("t.jpg", "train"), ("a.jpg", "val"), ("b.jpg", "val"), ("a.jpg", "val")]


def test_coco_errors_name_file_and_key(tmp_path: Path) -> None:
    bad = write_coco(tmp_path / "c.json", [(1, "a.jpg")], [(1, "ok"), (5, "orphan")])
    with pytest.raises(DataError, match=r"c\.json: annotations\[1\]: image_id 5"):
        read_coco(bad, images_dir=tmp_path)
    empty = write_coco(tmp_path / "e.json", [(1, "a.jpg")], [(1, "  ")])
    with pytest.raises(DataError, match=r"e\.json: annotations\[0\]: empty 'caption'"):
        read_coco(empty, images_dir=tmp_path)
    assert read_coco(write_coco(tmp_path / "x.json", [(1, "a")], [(1, "b")]),
                     images_dir=tmp_path)[0].split is None


@pytest.mark.parametrize("name, split", [("captions_train2014.json", "train"),
                                         ("captions_val2017.json", "val"),
                                         ("my_test.json", "test"), ("captions.json", None)])
def test_coco_split_from_name(name: str, split: str | None) -> None:
    assert coco_split_from_name(name) == split


# ---- Karpathy ----------------------------------------------------------------------------
def karpathy_doc() -> dict:
    return {"dataset": "flickr8k", "images": [
        {"filename": "a.jpg", "split": "train", "imgid": 0,
         "sentences": [{"raw": " A dog . ", "tokens": ["a", "dog"]},
                       {"raw": "", "tokens": ["a", "pup"]}]},
        {"filename": "b.jpg", "split": "restval", "imgid": 1,
         "sentences": [{"raw": "Cats", "tokens": ["cats"]}]},
        {"filename": "c.jpg", "split": "test", "imgid": 2,
         "sentences": [{"raw": "A car", "tokens": ["a", "car"]}]}]}


def test_karpathy_records(tmp_path: Path) -> None:
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps(karpathy_doc()))
    d = str(tmp_path)
    assert triples(read_karpathy(path)) == [(f"{d}/a.jpg", "A dog .", "train"),
                                            (f"{d}/a.jpg", "a pup", "train"),
                                            (f"{d}/b.jpg", "Cats", "train"),
                                            (f"{d}/c.jpg", "A car", "test")]
    assert read_karpathy(path)[3].meta == {"imgid": 2}
    (tmp_path / "images").mkdir()
    assert read_karpathy(path)[0].image == f"{d}/images/a.jpg"


def test_karpathy_coco_uses_filepath(tmp_path: Path) -> None:
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "v.jpg", "split": "val", "cocoid": 42,
         "sentences": [{"raw": "x"}]}]}))
    rec = read_karpathy(path, images_dir="/coco")[0]
    assert (rec.image, rec.split, rec.meta) == ("/coco/val2014/v.jpg", "val", {"cocoid": 42})


def test_karpathy_errors_name_file_and_key(tmp_path: Path) -> None:
    doc = karpathy_doc()
    doc["images"][1]["sentences"][0] = {"raw": " ", "tokens": []}
    doc["images"][2]["split"] = "holdout"
    path = tmp_path / "k.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"k\.json: images\[1\]\.sentences\[0\]: empty"):
        read_karpathy(path)
    doc["images"][1]["sentences"][0] = {"raw": "ok"}
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"k\.json: images\[2\]\.split: unknown split"):
        read_karpathy(path)
    path.write_text("{\n  nope")
    with pytest.raises(DataError, match=r"k\.json:2: invalid JSON"):
        read_karpathy(path)


# ---- Flickr8k token file -----------------------------------------------------------------
@pytest.fixture
def flickr(tmp_path: Path) -> Path:
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("a.jpg#0\tA dog .\na.jpg#1\tA  wet dog\nb.jpg#0\tCats\n\n"
                     "c.jpg#0\tA car\nd.jpg#0\tA tree\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("a.jpg\nzzz.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("b.jpg\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("c.jpg\n")
    return token


def test_flickr_token_records_and_official_splits(flickr: Path, tmp_path: Path) -> None:
    records, dropped = read_flickr_token(flickr)
    d = str(tmp_path)
    assert dropped == ()
    assert triples(records) == [(f"{d}/a.jpg", "A dog .", "train"),
                                (f"{d}/a.jpg", "A wet dog", "train"),
                                (f"{d}/b.jpg", "Cats", "val"), (f"{d}/c.jpg", "A car", "test"),
                                (f"{d}/d.jpg", "A tree", None)]


def test_flickr_images_folder_and_only_existing(flickr: Path, tmp_path: Path) -> None:
    touch(tmp_path / "Flicker8k_Dataset" / "b.jpg")
    assert read_flickr_token(flickr).records[0].image == str(tmp_path / "Flicker8k_Dataset/a.jpg")
    touch(tmp_path / "images" / "a.jpg")
    result = read_flickr_token(flickr, only_existing=True)
    assert isinstance(result, ReadResult)
    assert [r.text for r in result.records] == ["A dog .", "A wet dog"]
    assert result.num_dropped == 3
    assert result.dropped == tuple(str(tmp_path / "images" / f) for f in ("b.jpg", "c.jpg",
                                                                          "d.jpg"))


def test_flickr_explicit_split_files(flickr: Path, tmp_path: Path) -> None:
    dev = tmp_path / "mydev.txt"
    dev.write_text("a.jpg\nd.jpg\n")
    recs = read_flickr_token(flickr, split_files={"dev": dev}).records
    assert [r.split for r in recs] == ["val", "val", None, None, "val"]
    with pytest.raises(DataError, match=r"not found: .*nope\.txt"):
        read_flickr_token(flickr, split_files={"test": tmp_path / "nope.txt"})


def test_flickr_errors_name_file_and_line(flickr: Path, tmp_path: Path) -> None:
    (tmp_path / "Flickr_8k.testImages.txt").write_text("a.jpg\n")
    with pytest.raises(DataError, match=r"Flickr_8k\.testImages\.txt: a\.jpg is also listed"):
        read_flickr_token(flickr)
    bad = tmp_path / "bad.token.txt"
    bad.write_text("a.jpg#0\tok\na.jpg A dog without tab\n")
    with pytest.raises(DataError, match=r"bad\.token\.txt:2: expected"):
        read_flickr_token(bad, split_files={})


# ---- captions.txt ------------------------------------------------------------------------
def test_captions_csv_kaggle_layout(tmp_path: Path) -> None:
    path = tmp_path / "captions.txt"
    path.write_text('image,caption\na.jpg,"A dog , wet ."\na.jpg,A pup\nb.jpg,Cats\n')
    d = str(tmp_path)
    assert triples(read_captions_csv(path)) == [(f"{d}/a.jpg", "A dog , wet .", None),
                                                (f"{d}/a.jpg", "A pup", None),
                                                (f"{d}/b.jpg", "Cats", None)]
    (tmp_path / "Images").mkdir()
    assert read_captions_csv(path)[0].image == f"{d}/Images/a.jpg"
    assert read_captions_csv(path, images_dir="/x")[0].image == "/x/a.jpg"


# ---- JSONL -------------------------------------------------------------------------------
def write_lines(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_list_of_references_and_meta(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl",
                       {"image": "a.png", "caption": ["x y", " z "], "split": "valid",
                        "atoms": [[1, 2]]},
                       "",
                       {"image": "/abs/b.png", "caption": "w"})
    recs = read_jsonl(path)
    assert triples(recs) == [(f"{tmp_path}/a.png", "x y", "val"), (f"{tmp_path}/a.png", "z", "val"),
                             ("/abs/b.png", "w", None)]
    assert recs[0].meta == {"atoms": [[1, 2]]} and recs[2].meta == {}
    custom = write_lines(tmp_path / "s.jsonl", {"img": "m.png", "smiles": "CCO", "fold": 1})
    rec = read_jsonl(custom, "img", "smiles", None, images_dir="/mol")[0]
    assert (rec.image, rec.text, rec.split, rec.meta) == ("/mol/m.png", "CCO", None, {"fold": 1})


@pytest.mark.parametrize("row, message", [
    ('{"image": "a.png"', r"m\.jsonl:2: invalid JSON"),
    ('{"image": "a.png", "caption": ""}', r"m\.jsonl:2: 'caption' must be"),
    ('{"image": "a.png", "caption": ["ok", 3]}', r"m\.jsonl:2: 'caption' must be"),
    ('{"caption": "x"}', r"m\.jsonl:2: missing or empty 'image'"),
    ('{"image": "a.png", "caption": "x", "split": "later"}', r"m\.jsonl:2: unknown split"),
    ('["a.png", "x"]', r"m\.jsonl:2: expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = write_lines(tmp_path / "m.jsonl", {"image": "ok.png", "caption": "fine"}, row)
    with pytest.raises(DataError, match=message):
        read_jsonl(path)


# ---- detection and dispatch --------------------------------------------------------------
@pytest.fixture
def all_formats(tmp_path: Path) -> dict[str, tuple[str, Path]]:
    coco = write_coco(tmp_path / "captions_val2014.json", [(1, "a.jpg")], [(1, "A dog")])
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_text(json.dumps(karpathy_doc()))
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("a.jpg#0\tA dog\n")
    captions = tmp_path / "captions.txt"
    captions.write_text("image,caption\na.jpg,A dog\n")
    kaggle_csv = tmp_path / "captions.csv"
    kaggle_csv.write_text("image,caption\r\na.jpg,A dog\r\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption,split\na.jpg,A dog,test\n")
    jsonl = write_lines(tmp_path / "m.jsonl", {"image": "a.jpg", "caption": "A dog"})
    return {"coco": ("coco", coco), "karpathy": ("karpathy", karpathy),
            "flickr8k": ("flickr8k", token), "captions_txt": ("captions_csv", captions),
            "captions_csv": ("captions_csv", kaggle_csv), "csv": ("csv", manifest),
            "jsonl": ("jsonl", jsonl)}


def test_auto_detects_every_format(all_formats: dict[str, tuple[str, Path]],
                                   tmp_path: Path) -> None:
    for fmt, path in all_formats.values():
        assert detect_format(path) == fmt, path
        auto = read_any("auto", path, images_dir=tmp_path)
        assert triples(auto) == triples(read_any(fmt, path, images_dir=tmp_path))
        assert auto[0] == Record(str(tmp_path / "a.jpg"), auto[0].text, auto[0].split,
                                 auto[0].meta)


def test_read_any_several_paths_and_columns(all_formats: dict[str, tuple[str, Path]],
                                           tmp_path: Path) -> None:
    paths = [all_formats["csv"][1], all_formats["coco"][1]]
    recs = read_any("auto", paths, images_dir=tmp_path)
    assert [r.split for r in recs] == ["test", "val"]
    path = write_lines(tmp_path / "s.jsonl", {"png": "m.png", "smiles": "CCO"})
    assert read_any("jsonl", path, image_column="png", text_column="smiles")[0].text == "CCO"


def test_unknown_formats_are_errors_listing_the_formats(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown format 'xml'.*karpathy.*auto"):
        read_any("xml", tmp_path / "a.xml")
    other_json = tmp_path / "x.json"
    other_json.write_text('{"images": [{"file_name": "a.jpg"}]}')
    notes = write_lines(tmp_path / "notes.txt", "hello world")
    parquet = touch(tmp_path / "d.parquet")
    for path in (other_json, notes, parquet):
        with pytest.raises(DataError, match=rf"{path.name}: cannot detect.*coco, karpathy"):
            read_any("auto", path)
    with pytest.raises(DataError, match="file not found"):
        read_any("auto", tmp_path / "missing.csv")


def test_drop_missing(tmp_path: Path) -> None:
    a = str(touch(tmp_path / "a.jpg"))
    records, dropped = drop_missing([Record(a, "x"), Record("/no/b.jpg", "y"),
                                     Record("/no/b.jpg", "z")])
    assert [r.text for r in records] == ["x"] and dropped == ("/no/b.jpg",)


# ---- splits ------------------------------------------------------------------------------
def splits_by_key(records: list[Record], key=lambda r: r.image) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = defaultdict(set)
    for r in records:
        out[key(r)].add(r.split)
    return out


@settings(max_examples=40, deadline=None)
@given(groups=st.lists(st.integers(0, 30), min_size=1, max_size=60),
       fixed=st.lists(st.sampled_from([None, None, "train", "val", "test"]), min_size=31,
                      max_size=31),
       val=st.floats(0, 0.5), test=st.floats(0, 0.5), seed=st.integers(0, 3))
@example(groups=[0, 1, 2], fixed=[None] * 31, val=0.5, test=0.5, seed=0)
def test_group_splits_never_leaks_and_respects_fractions(groups: list[int], fixed: list,
                                                         val: float, test: float,
                                                         seed: int) -> None:
    records = [Record(f"img{g}.png", f"cap {i}", fixed[g]) for i, g in enumerate(groups)]
    out = group_splits(records, val, test, seed)
    assert [r.split for r in records] == [fixed[g] for g in groups]  # input unchanged
    assert all(len(s) == 1 and None not in s for s in splits_by_key(out).values())
    assert all(r.split == fixed[g] for r, g in zip(out, groups) if fixed[g])
    free = sorted({g for g in groups if fixed[g] is None})
    chosen = [next(r.split for r, h in zip(out, groups) if h == g) for g in free]
    assert chosen.count("val") == round(len(free) * val)
    # val + test = 1 can round past the groups there are (3 groups at 0.5/0.5: 2 + 2):
    # test gets what val leaves
    assert chosen.count("test") == min(round(len(free) * test), len(free) - round(len(free) * val))


def test_group_splits_group_without_split_joins_its_explicit_split() -> None:
    out = group_splits([Record("a", "x"), Record("a", "y", "test"), Record("b", "z")], 0, 0)
    assert [r.split for r in out] == ["test", "test", "train"]


def test_group_splits_conflicting_explicit_splits_name_the_group() -> None:
    with pytest.raises(DataError, match=r"group 'CCO' has records in both 'train' and 'val'"):
        group_splits([Record("1.png", "OCC", "train"), Record("2.png", "CCO", "val")], 0.1, 0.1,
                     key=canonical_smiles_key)
    with pytest.raises(ValueError, match="bad fractions"):
        group_splits([], 0.7, 0.5)


def test_same_molecule_never_in_two_splits() -> None:
    smiles = ["OCC", "CCO", "C(C)O", "c1ccccc1", "C1=CC=CC=C1", "CCN", "NCC", "CC(=O)O",
              "OC(C)=O", "C1CC", "C1CC", "CCCl", "ClCC", "O", "[OH2]"]
    records = [Record(f"{i}.png", s) for i, s in enumerate(smiles)]
    assert canonical_smiles_key(records[0]) == "CCO"
    assert canonical_smiles_key(records[9]) == "C1CC"  # invalid: raw text
    for seed in range(6):
        out = group_splits(records, 0.3, 0.3, seed, key=canonical_smiles_key)
        by_molecule = splits_by_key(out, canonical_smiles_key)
        assert len(by_molecule) == 7
        assert all(len(s) == 1 for s in by_molecule.values())
        assert out[0].split == out[1].split == out[2].split
    assert len(splits_by_key(group_splits(records, 0.3, 0.3, 0))) == len(smiles)


# ---- the shared Flickr8k subset ----------------------------------------------------------
@pytest.mark.skipif(not FLICKR.is_dir(), reason="shared Flickr8k data not available")
def test_shared_flickr8k_layouts_agree() -> None:
    token = read_flickr_token(FLICKR / "Flickr8k.token.txt", only_existing=True)
    kaggle = drop_missing(read_captions_csv(FLICKR / "captions.txt"))
    assert kaggle.dropped == () and token.num_dropped == 8093 - 1000

    def by_image(records: list[Record]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for r in records:
            out[r.image].append(r.text)
        return out

    a, b = by_image(token.records), by_image(kaggle.records)
    assert len(a) == 1000 and {len(t) for t in a.values()} == {5}
    assert a == b
    assert {r.split for r in token.records} == {"train", None}  # dev/test lists absent
    assert detect_format(FLICKR / "captions.txt") == "captions_csv"
    assert detect_format(FLICKR / "Flickr8k.token.txt") == "flickr8k"
