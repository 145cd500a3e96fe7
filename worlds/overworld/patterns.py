"""Procedural tile patterns: 8x8 pixel-art templates filled with a style's colours.

A pattern is an 8x8 ASCII template whose characters name a colour slot:

    b  base      a  accent      d  detail      .  back (ground showing around a shape)
    _  transparent (only in sprite patterns; drawn with the TRANSPARENT key colour)

`draw_pattern(name, base, accent, detail, back)` turns a template into an (8, 8, 3)
uint8 tile. Which patterns suit which tile type is decided by the tile set, not here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from worlds.overworld.tiles import ATLAS_TILE, TRANSPARENT

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "solid": ("bbbbbbbb",) * 8,
    "speckle": (
        "bbbbbbbb",
        "bbabbbbb",
        "bbbbbbab",
        "bbbbbbbb",
        "babbbbbb",
        "bbbbbabb",
        "bbbbbbbb",
        "bbbabbbb",
    ),
    "tufts": (
        "bbbbbbbb",
        "babbbbbb",
        "babbbabb",
        "bbbbbabb",
        "bbbbbbbb",
        "bbbabbbb",
        "bbbabbba",
        "bbbbbbbb",
    ),
    "flowers": (
        "bbbbbbbb",
        "bbabbbbb",
        "badabbbb",
        "bbabbbbb",
        "bbbbbabb",
        "bbbbadab",
        "bbbbbabb",
        "bbbbbbbb",
    ),
    "stripes": (
        "bbbbbbbb",
        "bbbbbbbb",
        "aaaaaaaa",
        "bbbbbbbb",
        "bbbbbbbb",
        "bbbbbbbb",
        "aaaaaaaa",
        "bbbbbbbb",
    ),
    "checker": (
        "bbbbaaaa",
        "bbbbaaaa",
        "bbbbaaaa",
        "bbbbaaaa",
        "aaaabbbb",
        "aaaabbbb",
        "aaaabbbb",
        "aaaabbbb",
    ),
    "waves": (
        "bbbbbbbb",
        "bbbbbbbb",
        "bbbaabbb",
        "baabbaab",
        "bbbbbbbb",
        "bbbbbbbb",
        "bbbbbbbb",
        "bbbbbbbb",
    ),
    "ripples": (
        "bbbbbbbb",
        "bbbbbbbb",
        "bbbbbbbb",
        "bbbbbbbb",
        "bbbbbbbb",
        "abbbbbaa",
        "baabbabb",
        "bbbbbbbb",
    ),
    "glints": (
        "bbbbbbbb",
        "bbabbbbb",
        "bbbbbbbb",
        "bbbbbbbb",
        "bbbbbbbb",
        "bbbbbabb",
        "bbbbbbbb",
        "bbbbbbbb",
    ),
    "brick": (
        "aaaaaaaa",
        "bbbabbbb",
        "bbbabbbb",
        "aaaaaaaa",
        "bbbbbbba",
        "bbbbbbba",
        "aaaaaaaa",
        "bbbabbbb",
    ),
    "window": (
        "aaaaaaaa",
        "bbbbbbbb",
        "bbaaaabb",
        "bbaddabb",
        "bbaddabb",
        "bbaaaabb",
        "bbbbbbbb",
        "bbbbbbbb",
    ),
    "shingles": (
        "bbbbbbbb",
        "abbbabbb",
        "aaaaaaaa",
        "bbbbbbbb",
        "bbabbbab",
        "aaaaaaaa",
        "bbbbbbbb",
        "abbbabbb",
    ),
    "planks": (
        "dbbbbbbd",
        "aaaaaaaa",
        "dbbbbbbd",
        "dbbbbbbd",
        "aaaaaaaa",
        "dbbbbbbd",
        "dbbbbbbd",
        "aaaaaaaa",
    ),
    "door": (
        "aaaaaaaa",
        ".aaaaaa.",
        ".abbbba.",
        ".abbbba.",
        ".abbbda.",
        ".abbbba.",
        ".abbbba.",
        ".abbbba.",
    ),
    "arch": (
        "aaaaaaaa",
        "..aaaa..",
        ".abbbba.",
        ".abbbba.",
        ".abbdba.",
        ".abbbba.",
        ".abbbba.",
        ".abbbba.",
    ),
    "tree": (
        "..bbbb..",
        ".bbaabb.",
        "bbaaabbb",
        "bbabbbbb",
        "bbbbbbbb",
        ".bbbbbb.",
        "...dd...",
        "...dd...",
    ),
    "pine": (
        "...bb...",
        "...ab...",
        "..babb..",
        "..abbb..",
        ".babbbb.",
        ".abbbbb.",
        "bbbbbbbb",
        "...dd...",
    ),
    "cactus": (
        "...bb...",
        "...ab.b.",
        "b..ab.b.",
        "b..abbb.",
        "bbbab...",
        "...ab...",
        "...ab...",
        "..dddd..",
    ),
    "rock": (
        "........",
        "..bbbb..",
        ".baabbb.",
        ".babbbbd",
        "bbbbbbbd",
        "bbbbbbdd",
        ".dddddd.",
        "........",
    ),
    "boulders": (
        "........",
        ".bbb....",
        "baabd...",
        "bbbdbbb.",
        ".ddbaabb",
        "...bbbbd",
        "...bbbdd",
        "....ddd.",
    ),
    "cross": (
        "........",
        ".aa..aa.",
        ".abbbba.",
        "..bddb..",
        "..bddb..",
        ".abbbba.",
        ".aa..aa.",
        "........",
    ),
    "flag": (
        "..dbbbb.",
        "..dbbbbb",
        "..dbbbb.",
        "..d.....",
        "..d.....",
        "..d.....",
        ".aaa....",
        "........",
    ),
    "slime": (
        "________",
        "___dd___",
        "__dbbd__",
        "_dbbbbd_",
        "_dabbad_",
        "dbbbbbbd",
        "dbbbbbbd",
        "_dddddd_",
    ),
    "beetle": (
        "_d____d_",
        "__d__d__",
        "__dddd__",
        "_dbabbd_",
        "dbbdbbbd",
        "dbbdbbbd",
        "_dbdbbd_",
        "d_dddd_d",
    ),
    "person": (
        "__dddd__",
        "_dddddd_",
        "__aaaa__",
        "__dada__",
        "_bbbbbb_",
        "a_bbbb_a",
        "__bbbb__",
        "__d__d__",
    ),
    "knight": (
        "___dd___",
        "__dddd__",
        "__daad__",
        "_bbbbbb_",
        "abbddbba",
        "_bbbbbb_",
        "__b__b__",
        "_dd__dd_",
    ),
}

PATTERN_NAMES: tuple[str, ...] = tuple(_TEMPLATES)
# Patterns that leave pixels transparent; only these make sense for sprite tiles.
SPRITE_PATTERNS: tuple[str, ...] = tuple(name for name, rows in _TEMPLATES.items() if "_" in "".join(rows))

_SLOTS = "bad._"  # base, accent, detail, back, transparent


def _slot_index(name: str) -> np.ndarray:
    """(8, 8) int8: which colour slot each pixel of a template uses."""
    rows = _TEMPLATES[name]
    assert len(rows) == ATLAS_TILE and all(len(r) == ATLAS_TILE for r in rows), name
    index = np.array([[_SLOTS.index(ch) for ch in row] for row in rows], dtype=np.int8)
    index.flags.writeable = False
    return index


_SLOT_INDEX: dict[str, np.ndarray] = {name: _slot_index(name) for name in PATTERN_NAMES}


def draw_pattern(
    name: str,
    base: Sequence[int],
    accent: Sequence[int],
    detail: Sequence[int],
    back: Sequence[int],
) -> np.ndarray:
    """Fill the template `name` with colours; returns (8, 8, 3) uint8."""
    if name not in _TEMPLATES:
        raise ValueError(f"unknown tile pattern {name!r}; expected one of {list(PATTERN_NAMES)}")
    palette = np.array([base, accent, detail, back, TRANSPARENT], dtype=np.uint8)  # (5, 3)
    return palette[_SLOT_INDEX[name]]  # (8, 8, 3)
