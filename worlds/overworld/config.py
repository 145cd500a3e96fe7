"""Typed configuration of the overworld, mirrored by the YAML files in conf/world/.

`OverworldConfig.from_dict` accepts a plain mapping or an omegaconf DictConfig (the
Hydra `world` group) and raises ValueError naming any unknown, missing or bad key,
so a typo fails at start-up. The tile set (how each tile type looks) is part of the
config: one `TileStyle` per tile name of `tiles.TILE_NAMES`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from worlds.overworld.patterns import PATTERN_NAMES, SPRITE_PATTERNS
from worlds.overworld.tiles import ATLAS_TILE, SPRITE_TILES, TILE_IDS, TILE_NAMES, TRANSPARENT

RGB = tuple[int, int, int]
WORLD_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "world"


def parse_color(value: Any, where: str) -> RGB:
    """A colour given as "#rrggbb" or [r, g, b] with 0 <= each <= 255."""
    if isinstance(value, str):
        text = value.lstrip("#")
        if len(text) != 6:
            raise ValueError(f"{where}: colour {value!r} is not '#rrggbb'")
        try:
            rgb = tuple(int(text[i:i + 2], 16) for i in (0, 2, 4))
        except ValueError:
            raise ValueError(f"{where}: colour {value!r} is not '#rrggbb'") from None
    elif isinstance(value, Sequence) and len(value) == 3 and all(
        isinstance(c, int) and not isinstance(c, bool) for c in value
    ):
        rgb = tuple(int(c) for c in value)
        if not all(0 <= c <= 255 for c in rgb):
            raise ValueError(f"{where}: colour {value!r} has a channel outside 0..255")
    else:
        raise ValueError(f"{where}: colour {value!r} must be '#rrggbb' or [r, g, b]")
    if rgb == TRANSPARENT:
        raise ValueError(f"{where}: colour {value!r} is the reserved transparent key {TRANSPARENT}")
    return rgb  # type: ignore[return-value]


@dataclass(frozen=True)
class TileStyle:
    """How one tile type looks: a pattern name and the colours of its slots."""

    pattern: str
    base: RGB
    accent: RGB
    detail: RGB
    back: RGB

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], tile_name: str) -> "TileStyle":
        where = f"world.tileset.{tile_name}"
        if not isinstance(d, Mapping):
            raise ValueError(f"{where} must be a mapping with pattern/base/accent[/detail/back], got {d!r}")
        allowed = {"pattern", "base", "accent", "detail", "back"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
        for key in ("pattern", "base", "accent"):
            if key not in d:
                raise ValueError(f"{where}: missing key {key!r}")
        pattern = d["pattern"]
        if pattern not in PATTERN_NAMES:
            raise ValueError(f"{where}.pattern: unknown pattern {pattern!r}; expected one of {list(PATTERN_NAMES)}")
        if pattern in SPRITE_PATTERNS and TILE_IDS[tile_name] not in SPRITE_TILES:
            raise ValueError(f"{where}.pattern: {pattern!r} has transparent pixels; only sprite tiles may use it")
        base = parse_color(d["base"], f"{where}.base")
        accent = parse_color(d["accent"], f"{where}.accent")
        detail = parse_color(d["detail"], f"{where}.detail") if "detail" in d else accent
        back = parse_color(d["back"], f"{where}.back") if "back" in d else base
        return cls(pattern=pattern, base=base, accent=accent, detail=detail, back=back)


def _exact_keys(given: Mapping[str, Any], expected: list[str], what: str) -> None:
    """Every expected key and no other, or a ValueError naming the offenders."""
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; expected {expected}")
    missing = [n for n in expected if n not in given]
    if missing:
        raise ValueError(f"missing {what} {missing}")


def _positive_int(d: Mapping[str, Any], key: str, minimum: int = 1, maximum: int | None = None) -> int:
    value = d[key]
    if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
            or (maximum is not None and value > maximum)):
        span = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"world.{key} must be an integer {span}, got {value!r}")
    return value


def _bool(d: Mapping[str, Any], key: str) -> bool:
    value = d[key]
    if not isinstance(value, bool):
        raise ValueError(f"world.{key} must be true or false, got {value!r}")
    return value


# What a world config that leaves these keys out means: configs written before creatures
# faced their heading (recordings, checkpoints) describe a world whose creatures did not.
OMITTED_MEANS: dict[str, Any] = {"family": "overworld", "creature_facing": False}

MAX_MAP_SIZE = 2048  # tiles a side: a map's noise fields then take about 100 MB to generate


@dataclass(frozen=True)
class OverworldConfig:
    """All options of one overworld (a conf/world/*.yaml file)."""

    name: str             # the preset's name, e.g. overworld, overworld_desert
    family: Literal["overworld"]
    view: int             # frame side in pixels (frames are view x view RGB)
    tile: int             # tile side in pixels; a multiple of the 8-pixel atlas
    map_size: int         # map side in tiles
    scroll: int           # pixels the player moves per move action; divides tile
    num_creatures: int    # wandering creatures spawned near the player
    creature_period: int  # creatures move 1 pixel every this many frames
    creature_facing: bool  # a creature's sprite turns to face where it walks (its tile faces up)
    water_period: int     # water switches appearance every this many frames
    num_houses: int       # houses the map generator tries to place
    tileset: tuple[TileStyle, ...]  # one style per tile id, in TILE_NAMES order

    @property
    def player_view(self) -> int:
        """The player's top-left pixel in the view, on both axes: the view follows the
        player, so it is drawn there in every frame."""
        return self.view // 2 - self.tile // 2

    @classmethod
    def from_dict(cls, d: Any) -> "OverworldConfig":
        """Validate a mapping (or omegaconf DictConfig) into a config."""
        from omegaconf import DictConfig, OmegaConf

        if isinstance(d, DictConfig):
            d = OmegaConf.to_container(d, resolve=True)
        if not isinstance(d, Mapping):
            raise ValueError(f"world config must be a mapping, got {type(d).__name__}")
        d = {**OMITTED_MEANS, **d}
        _exact_keys(d, [f.name for f in fields(cls)], "world config key(s)")

        if not isinstance(d["name"], str) or not d["name"]:
            raise ValueError(f"world.name must be a non-empty string, got {d['name']!r}")
        if d["family"] != "overworld":
            raise ValueError(f"world.family must be 'overworld', got {d['family']!r}")
        tile = _positive_int(d, "tile")
        if tile % ATLAS_TILE:
            raise ValueError(f"world.tile must be a multiple of {ATLAS_TILE} (the atlas tile), got {tile}")
        view = _positive_int(d, "view")
        if view % tile or view // tile < 3:
            raise ValueError(f"world.view must be a multiple of world.tile={tile} and at least 3 tiles, got {view}")
        scroll = _positive_int(d, "scroll")
        if tile % scroll:
            raise ValueError(f"world.scroll must divide world.tile={tile}, got {scroll}")
        map_size = _positive_int(d, "map_size", minimum=32, maximum=MAX_MAP_SIZE)

        tileset = d["tileset"]
        if not isinstance(tileset, Mapping):
            raise ValueError(f"world.tileset must map tile names to styles, got {tileset!r}")
        _exact_keys(tileset, list(TILE_NAMES), "world.tileset tile name(s)")

        return cls(
            name=d["name"],
            family="overworld",
            view=view,
            tile=tile,
            map_size=map_size,
            scroll=scroll,
            num_creatures=_positive_int(d, "num_creatures", minimum=0),
            creature_period=_positive_int(d, "creature_period"),
            creature_facing=_bool(d, "creature_facing"),
            water_period=_positive_int(d, "water_period"),
            num_houses=_positive_int(d, "num_houses", minimum=0),
            tileset=tuple(TileStyle.from_dict(tileset[n], n) for n in TILE_NAMES),
        )

    @classmethod
    def coerce(cls, cfg: Any) -> "OverworldConfig":
        """Pass a config through; validate anything else with `from_dict`."""
        return cfg if isinstance(cfg, cls) else cls.from_dict(cfg)


def load_config(name_or_path: str | Path = "overworld") -> OverworldConfig:
    """Load a world preset by name (conf/world/NAME.yaml) or from a YAML path."""
    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = WORLD_CONF_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"world config {str(name_or_path)!r} not found (looked for {path})")
    return OverworldConfig.from_dict(OmegaConf.load(path))
