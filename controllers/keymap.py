"""Key bindings as data: a mapping from a binding name to the key names that trigger it.

A keymap comes from config, e.g. `{right: [right, d], place: [space]}`. Key names are
SDL's lower-case names as printed by `pygame.key.name` ("right", "w", "space", "f12",
"escape") or a single printable character ("?"). Matching a key needs no pygame:
callers translate an event into its key name and typed character first (pygame is
imported only to check a keymap's names, `sdl_name`, where it is installed).
"""
from __future__ import annotations

import warnings
from typing import Iterable, Mapping


class Keymap:
    """Which binding (an action name or a window command) each key triggers."""

    def __init__(self, bindings: Mapping[str, Iterable[str]], allowed: Iterable[str], where: str):
        allowed = tuple(allowed)
        self.bindings: dict[str, tuple[str, ...]] = {}
        self._by_key: dict[str, str] = {}
        for name, keys in bindings.items():
            if name not in allowed:
                raise ValueError(f"{where}: unknown binding {name!r}; expected one of {list(allowed)}")
            if isinstance(keys, str):
                keys = [keys]
            normalized = tuple(_normalize(k, where, name) for k in keys)
            self.bindings[name] = normalized
            for key in normalized:
                if key in self._by_key and self._by_key[key] != name:
                    raise ValueError(
                        f"{where}: key {key!r} is bound to both {self._by_key[key]!r} and {name!r}"
                    )
                self._by_key[key] = name

    def lookup(self, key_name: str, char: str = "") -> str | None:
        """The binding for a key (by SDL name), or for the character it typed; else None."""
        found = self._by_key.get(key_name.lower())
        if found is None and char:
            found = self._by_key.get(char)
        return found

    @property
    def keys(self) -> set[str]:
        return set(self._by_key)

    def describe(self, name: str) -> str:
        """The keys of one binding for help text, e.g. 'right / d'."""
        return " / ".join(k.upper() if len(k) == 1 and k.isalpha() else k for k in self.bindings.get(name, ()))


def check_disjoint(a: Keymap, a_where: str, b: Keymap, b_where: str) -> None:
    """Raise ValueError if a key is bound in both keymaps (e.g. movement and window commands)."""
    clash = sorted(a.keys & b.keys)
    if clash:
        raise ValueError(f"keys {clash} are bound in both {a_where} and {b_where}; pick other keys")


def sdl_name(name: str) -> str | None:
    """The name pygame gives the key called `name` (the one a key event reports: "keypad
    1" is "[1]"); "" for a name SDL does not know; None when pygame is not installed (not
    checked: without pygame there is no window to press keys in)."""
    try:
        import pygame
    except ImportError:
        return None
    with warnings.catch_warnings():  # the names need no pygame.init()
        warnings.simplefilter("ignore")
        try:
            return pygame.key.name(pygame.key.key_code(name))
        except ValueError:
            return ""


def _normalize(key: object, where: str, name: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}.{name}: key names must be non-empty strings, got {key!r}")
    # A single character keeps its case ("?" vs "/"); multi-letter SDL names are lower-case.
    key = key if len(key) == 1 and not key.isalpha() else key.lower()
    if len(key) == 1:
        return key  # matched against the typed character too
    known = sdl_name(key)
    if known == "":
        raise ValueError(f"{where}.{name}: unknown key name {key!r}; expected an SDL key name such as 'escape', "
                         "'right', 'f12', 'space', 'left shift', or one character")
    return key if known is None else known.lower()
