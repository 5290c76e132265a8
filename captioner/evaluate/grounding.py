"""Attention grounding scores: does the decoder look at the thing it names?

A word is *grounded* when the peak of the attention map used to emit it, mapped to
the pixel centre of its grid cell, falls inside the box of the object the word
refers to.  ``shapes_grounding`` scores colour and shape words on the synthetic
shapes dataset; other datasets (e.g. molecule atoms) can reuse ``peak_cell_center``,
``point_in_box`` and ``grounding_result``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from captioner.data.molecules import atom_tokens_positions, cell_of_point
from captioner.data.shapes import ShapesSpec


def _check_grid(length: int, grid_hw: tuple[int, int]) -> None:
    gh, gw = grid_hw
    if gh * gw != length:
        raise ValueError(
            f"attention length {length} does not match grid {gh}x{gw} = {gh * gw} cells"
        )


def peak_cell_center(
    attention_row: np.ndarray, grid_hw: tuple[int, int], image_hw: tuple[int, int]
) -> tuple[float, float]:
    """Pixel centre ``(x, y)`` of the arg-max cell of a flat (row-major) attention map.

    Example:
        >>> peak_cell_center(np.eye(1, 49, 8)[0], (7, 7), (112, 112))
        (24.0, 24.0)
    """
    row_values = np.asarray(attention_row).reshape(-1)
    _check_grid(row_values.size, grid_hw)
    gh, gw = grid_hw
    height, width = image_hw
    row, col = divmod(int(np.argmax(row_values)), gw)
    return (col + 0.5) * width / gw, (row + 0.5) * height / gh


def point_in_box(point: tuple[float, float], box: Sequence[float]) -> bool:
    """True when ``(x, y)`` lies inside ``[x0, y0, x1, y1]`` (edges included)."""
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def grounding_result(n_ok: int, n_total: int) -> dict:
    """``{"grounding": share, "grounded": n_ok, "object_words": n_total}`` (0.0 if empty)."""
    share = n_ok / n_total if n_total else 0.0
    return {"grounding": float(share), "grounded": int(n_ok), "object_words": int(n_total)}


@dataclass(frozen=True)
class Phrase:
    """An object mention in a predicted caption: its word positions, colour and shape.

    Example:
        >>> Phrase(positions=(1, 2), color="red", shape="circle").complete
        True
    """

    positions: tuple[int, ...]
    color: str | None
    shape: str | None

    @property
    def complete(self) -> bool:
        """True when the phrase names both a colour and a shape."""
        return self.color is not None and self.shape is not None


def parse_phrases(words: Sequence[str], spec: ShapesSpec | None = None) -> list[Phrase]:
    """Split a predicted caption into object phrases.

    A colour word directly followed by a shape word forms one phrase; a lone colour
    or shape word forms an incomplete phrase (which can never match an object).

    Example:
        >>> [p.positions for p in parse_phrases("a red circle above a square".split())]
        [(1, 2), (5,)]
    """
    kinds = (spec or ShapesSpec()).object_words()
    phrases: list[Phrase] = []
    t = 0
    while t < len(words):
        kind = kinds.get(words[t])
        nxt = words[t + 1] if t + 1 < len(words) else None
        if kind == "color" and kinds.get(nxt) == "shape":
            phrases.append(Phrase((t, t + 1), words[t], nxt))
            t += 2
            continue
        if kind is not None:
            color, shape = (words[t], None) if kind == "color" else (None, words[t])
            phrases.append(Phrase((t,), color, shape))
        t += 1
    return phrases


def match_phrases(phrases: Sequence[Phrase], objects: Sequence[dict]) -> list[int]:
    """Object index per phrase (-1 if none): the k-th phrase takes the k-th object when
    colour and shape agree and it is unused, otherwise the first unused object that
    agrees.

    Example:
        >>> objs = [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]
        >>> match_phrases(parse_phrases("a blue square".split()), objs)
        [1]
    """
    used: set[int] = set()
    matches = []
    for k, phrase in enumerate(phrases):
        fits = [
            i
            for i, obj in enumerate(objects)
            if phrase.complete
            and i not in used
            and (obj["color"], obj["shape"]) == (phrase.color, phrase.shape)
        ]
        choice = k if k in fits else (fits[0] if fits else -1)
        if choice >= 0:
            used.add(choice)
        matches.append(choice)
    return matches


def _caption_counts(
    words: Sequence[str],
    attention: np.ndarray,
    objects: Sequence[dict],
    image_hw: tuple[int, int],
    grid_hw: tuple[int, int],
    spec: ShapesSpec | None,
) -> tuple[int, int]:
    """(grounded, object words) for one predicted caption."""
    attention = np.asarray(attention)
    attention = attention.reshape(attention.shape[0], -1) if attention.ndim > 1 else attention
    if attention.ndim != 2 or attention.shape[0] < len(words):
        raise ValueError(
            f"attention of shape {attention.shape} has fewer steps than the "
            f"{len(words)} predicted words"
        )
    _check_grid(attention.shape[1], grid_hw)
    phrases = parse_phrases(words, spec)
    n_ok = n_total = 0
    for phrase, index in zip(phrases, match_phrases(phrases, objects), strict=True):
        n_total += len(phrase.positions)
        if index < 0:
            continue
        box = objects[index]["box"]
        n_ok += sum(
            point_in_box(peak_cell_center(attention[t], grid_hw, image_hw), box)
            for t in phrase.positions
        )
    return n_ok, n_total


def shapes_grounding(
    pred_words: Sequence[Sequence[str]],
    attentions: Sequence[np.ndarray],
    objects: Sequence[Sequence[dict]],
    image_hw: tuple[int, int],
    grid_hw: tuple[int, int],
    spec: ShapesSpec | None = None,
) -> dict:
    """Share of predicted colour/shape words whose attention peak lies in their object.

    ``attentions[i][t]`` (length ``gh * gw``, row-major) is the attention used to emit
    ``pred_words[i][t]``; ``objects[i]`` are the image's objects in canonical order,
    each with ``"color"``, ``"shape"`` and ``"box"`` ``[x0, y0, x1, y1]``.  Words of
    phrases that match no object count as not grounded.

    Example:
        >>> att = np.zeros((3, 49)); att[:, 8] = 1.0  # peak at cell (1, 1): (24, 24)
        >>> objs = [[{"color": "red", "shape": "circle", "box": [10, 10, 40, 40]}]]
        >>> shapes_grounding([["a", "red", "circle"]], [att], objs, (112, 112), (7, 7))
        {'grounding': 1.0, 'grounded': 2, 'object_words': 2}
    """
    if not len(pred_words) == len(attentions) == len(objects):
        raise ValueError(
            f"got {len(pred_words)} captions, {len(attentions)} attention maps and "
            f"{len(objects)} object lists"
        )
    n_ok = n_total = 0
    for words, attention, objs in zip(pred_words, attentions, objects, strict=True):
        ok, total = _caption_counts(words, attention, objs, image_hw, grid_hw, spec)
        n_ok, n_total = n_ok + ok, n_total + total
    return grounding_result(n_ok, n_total)


def peak_cell(attention_row: np.ndarray, grid_hw: tuple[int, int]) -> tuple[int, int]:
    """``(row, col)`` of the arg-max cell of a flat (row-major) attention map.

    Example:
        >>> peak_cell(np.eye(1, 49, 10)[0], (7, 7))
        (1, 3)
    """
    values = np.asarray(attention_row).reshape(-1)
    _check_grid(values.size, grid_hw)
    return divmod(int(np.argmax(values)), grid_hw[1])


def molecule_grounding(pred_tokens: Sequence[Sequence[str]], attentions: Sequence[np.ndarray],
                       references: Sequence[str], atoms: Sequence[Sequence[dict]],
                       image_hws: Sequence[tuple[int, int]], grid_hw: tuple[int, int]) -> dict:
    """Share of atom tokens whose attention peak is the grid cell containing that atom.

    ``atoms[i]`` lists the reference molecule's atoms in the output order of its
    canonical SMILES ``references[i]`` (as ``render-molecules`` writes them), with pixel
    ``x``/``y`` in an image of ``image_hws[i]``. The k-th atom token of a prediction maps
    to the k-th atom only when the prediction spells the reference exactly, so only those
    predictions are scored; ``molecules`` counts them. ``within_one_cell`` is the share
    whose peak is that cell or one of its 8 neighbours (atoms are often a cell apart).

    Example:
        >>> atoms = [[{"symbol": "C", "x": 10, "y": 10}, {"symbol": "O", "x": 200, "y": 10}]]
        >>> att = np.zeros((2, 49)); att[0, 0] = att[1, 5] = 1.0
        >>> molecule_grounding([["C", "O"]], [att], ["CO"], atoms, [(224, 224)], (7, 7))
        {'grounding': 0.5, 'grounded': 1, 'object_words': 2, 'molecules': 1, 'within_one_cell': 1.0}
    """
    n_ok = n_near = n_total = n_mols = 0
    for tokens, attention, ref, mol_atoms, hw in zip(pred_tokens, attentions, references, atoms,
                                                    image_hws, strict=True):
        if "".join(tokens) != ref:
            continue
        n_mols += 1
        for index, atom in atom_tokens_positions(ref, mol_atoms):
            n_total += 1
            target = cell_of_point((float(atom["x"]), float(atom["y"])), grid_hw, hw)
            peak = peak_cell(attention[index], grid_hw)
            n_ok += peak == target
            n_near += max(abs(peak[0] - target[0]), abs(peak[1] - target[1])) <= 1
    near = n_near / n_total if n_total else 0.0
    return {**grounding_result(n_ok, n_total), "molecules": n_mols, "within_one_cell": near}
