"""RDKit helpers shared by data splitting, decoding and metrics: parsing, canonical
SMILES, quiet logging. RDKit is optional; a clear ImportError names it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def chem() -> Any:
    try:
        from rdkit import Chem
    except ImportError as exc:
        raise ImportError("SMILES support needs RDKit: pip install rdkit") from exc
    return Chem


@contextmanager
def quiet_rdkit() -> Iterator[None]:
    """Silence RDKit's ``rdApp.*`` logging inside the block, then restore each channel.

    Example:
        >>> with quiet_rdkit():
        ...     canonical_smiles("C1CC") is None
        True
    """
    chem()
    from rdkit import RDLogger, rdBase

    before = [line.split(":") for line in rdBase.LogStatus().splitlines() if ":" in line]
    RDLogger.DisableLog("rdApp.*")
    try:
        yield
    finally:
        for name, state in before:
            (RDLogger.EnableLog if state.strip() == "enabled" else RDLogger.DisableLog)(name)


def parse(smiles: str) -> Any:
    """RDKit molecule with at least one atom, or None (``""`` parses to an empty molecule)."""
    mol = chem().MolFromSmiles(smiles)
    return mol if mol is not None and mol.GetNumAtoms() > 0 else None


def canonical_smiles(smiles: str, isomeric: bool = True) -> str | None:
    """RDKit canonical SMILES (without stereo when ``isomeric=False``); None if invalid.

    Example:
        >>> canonical_smiles("OCC"), canonical_smiles("C[C@H](N)O", isomeric=False)
        ('CCO', 'CC(N)O')
        >>> canonical_smiles("C1CC") is None
        True
    """
    with quiet_rdkit():
        mol = parse(smiles)
        return None if mol is None else chem().MolToSmiles(mol, isomericSmiles=isomeric)

