"""The overworld: a top-down tile world with a scrolling camera, animated water,
wandering creatures and persistent markers; deterministic per seed and actions.

Public API: `Overworld` (one world), `BatchOverworld` (vectorized data generation),
`OverworldConfig` / `load_config` (conf/world/*.yaml), tile sets (`build_atlas`,
`random_tileset`, `atlas_to_prompt`) and the tile vocabulary (`TILE_NAMES`).
"""
from worlds.overworld.batch import BatchOverworld
from worlds.overworld.config import OverworldConfig, TileStyle, load_config
from worlds.overworld.tiles import NUM_TILES, TILE_IDS, TILE_NAMES
from worlds.overworld.tileset import PROMPT_DIM, PROMPT_TOKENS, atlas_to_prompt, build_atlas, random_tileset
from worlds.overworld.world import Overworld

__all__ = [
    "BatchOverworld", "Overworld", "OverworldConfig", "TileStyle", "load_config", "NUM_TILES", "TILE_IDS",
    "TILE_NAMES", "PROMPT_DIM", "PROMPT_TOKENS", "atlas_to_prompt", "build_atlas", "random_tileset",
]
