"""Patient names, MRNs and birth dates as hospital exports put them into file and folder names
(transliterated, any case), and a scanner for them in everything a run wrote."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterable
from pathlib import Path

#: the patients of the tests: Müller^Jürgen (MRN778899, born 1961-04-23) and Doe^Jane
#: (MRN123456, born 1975-01-02), in the spellings exports use (MUELLER, MULLER, Muller, ...)
NAME_PATTERNS = [
    rb"m(\xc3\xbc|\xc3\x9c|\xfc|\xdc|ue|u)ller",
    rb"j(\xc3\xbc|\xc3\x9c|\xfc|\xdc|ue|u)rgen",
    rb"doe[\W_]{0,3}jane",
    rb"jane[\W_]{0,3}doe",
    rb"778899",
    rb"mrn123456",
    rb"19610423",
    rb"1961-04-23",
    rb"19750102",
    rb"1975-01-02",
]
PHI_RX = re.compile(b"|".join(NAME_PATTERNS), re.IGNORECASE)


def phi_hits_in_text(text: str) -> list[str]:
    return [m.group(0).decode("utf-8", "replace") for m in PHI_RX.finditer(text.encode())]


def phi_hits(roots: Iterable[Path], skip: Iterable[Path] = ()) -> tuple[list[str], int]:
    """(``path: match`` for every name, MRN or birth date found in a file or folder name or
    in a file's content (gzip decompressed) below ``roots``, number of files read); folders in
    ``skip`` (the archive itself) are not read."""
    skip = [Path(s).resolve() for s in skip]
    hits, n = [], 0
    for root in roots:
        for f in sorted(Path(root).rglob("*")):
            if any(f.resolve() == s or s in f.resolve().parents for s in skip):
                continue
            hits += [f"{f}: name {m}" for m in phi_hits_in_text(f.name)]
            if not f.is_file() or f.is_symlink():
                continue
            data = f.read_bytes()
            if f.name.endswith(".gz"):
                data = gzip.decompress(data)
            hits += [f"{f}: {m.group(0)!r}" for m in PHI_RX.finditer(data)]
            n += 1
    return hits, n
