"""The overworld simulator: determinism, collisions, markers, batching, tile sets, configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from worlds import build_world
from worlds.actions import DOWN, IDLE, LEFT, NUM_ACTIONS, PLACE, RIGHT, UP
from worlds.overworld import (
    NUM_TILES, PROMPT_DIM, PROMPT_TOKENS, TILE_NAMES, BatchOverworld, Overworld, OverworldConfig,
    atlas_to_prompt, random_tileset,
)
from worlds.overworld.tiles import MARKER, SPRITE_TILES, TRANSPARENT, WATER_A, blocking_table

CONF = Path(__file__).resolve().parents[1] / "conf" / "world"
WORLD_NAMES = ("overworld", "overworld_desert", "overworld_snow", "overworld_autumn")
OPPOSITE = {UP: DOWN, DOWN: UP, LEFT: RIGHT, RIGHT: LEFT}


def world_dict(name: str = "overworld", **overrides) -> dict:
    d = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    d.update(overrides)
    return d


def make_world(**overrides) -> Overworld:
    return Overworld(OverworldConfig.from_dict(world_dict(**overrides)))


def rollout(world: Overworld, seed: int, actions) -> np.ndarray:
    frames = [world.reset(seed)]
    frames += [world.step(int(a)) for a in actions]
    return np.stack(frames)


def overlaps_blocking(tiles: np.ndarray, pos: np.ndarray, tile: int = 8) -> bool:
    """Whether a tile-sized box at map pixel `pos` touches a blocking tile of `tiles`."""
    rows = tiles[pos[0] // tile:(pos[0] + tile - 1) // tile + 1, pos[1] // tile:(pos[1] + tile - 1) // tile + 1]
    return bool(blocking_table()[rows].any())


def water_in_view(world: Overworld) -> bool:
    cfg, (y, x) = world.cfg, world.player_pos
    half = cfg.view // 2 - cfg.tile // 2
    r0, c0 = max((y - half) // cfg.tile, 0), max((x - half) // cfg.tile, 0)
    r1, c1 = (y - half + cfg.view) // cfg.tile + 1, (x - half + cfg.view) // cfg.tile + 1
    return bool((world.tiles[r0:r1, c0:c1] == WATER_A).any())


# ------------------------------------------------------------------ determinism
def test_same_seed_and_actions_give_identical_frames():
    actions = np.random.default_rng(0).integers(0, NUM_ACTIONS, size=200)
    a = rollout(make_world(), 7, actions)
    b = rollout(make_world(), 7, actions)
    world = make_world()
    rollout(world, 3, actions)
    c = rollout(world, 7, actions)  # a reset forgets the previous play-through (markers too)
    assert a.shape == (201, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_different_seeds_give_different_worlds():
    world = make_world()
    firsts, maps = [], []
    for seed in range(4):
        firsts.append(world.reset(seed))
        maps.append(world.tiles.copy())
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(maps[i], maps[j])
            assert not np.array_equal(firsts[i], firsts[j])


def test_spawn_is_walkable_and_player_is_drawn_at_the_centre():
    world = make_world()
    for seed in range(5):
        frame = world.reset(seed)
        assert not overlaps_blocking(world.tiles, world.player_pos)
        player = world.atlas[SPRITE_TILES[1]]  # (8, 8, 3)
        opaque = np.any(player != np.array(TRANSPARENT, dtype=np.uint8), axis=-1)
        np.testing.assert_array_equal(frame[28:36, 28:36][opaque], player[opaque])


# ------------------------------------------------------------------- collisions
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_player_never_enters_blocking_tiles(seed):
    world = make_world()
    world.reset(seed)
    rng = np.random.default_rng(seed)
    # Long straight walks run into trees, rocks, houses and the water around the map.
    actions = [a for a in (RIGHT, DOWN, LEFT, UP, LEFT, DOWN) for _ in range(300)]
    actions += rng.integers(0, NUM_ACTIONS, size=600).tolist()
    blocked_moves = 0
    for action in actions:
        before = world.player_pos.copy()
        world.step(action)
        after = world.player_pos
        assert not overlaps_blocking(world.tiles, after), (action, after)
        moved = np.abs(after - before).sum()
        assert moved in (0, world.cfg.scroll)
        if action in OPPOSITE and moved == 0:
            blocked_moves += 1
    assert blocked_moves > 100  # the walls were really hit


def test_place_leaves_a_marker_that_persists():
    cfg = OverworldConfig.from_dict(world_dict(num_creatures=0))
    seed = 0

    def walk_distance(direction: int) -> int:
        world = Overworld(cfg)
        world.reset(seed)
        for _ in range(4):  # the same first steps as below
            world.step(DOWN)
        start = world.player_pos.copy()
        for _ in range(40):
            world.step(direction)
        return int(np.abs(world.player_pos - start).sum())

    world = Overworld(cfg)
    world.reset(seed)
    before = world.tiles.copy()
    world.step(PLACE)
    r, c = (world.player_pos + 4) // 8
    assert world.tiles[r, c] == MARKER and before[r, c] != MARKER
    assert (world.tiles != before).sum() == 1
    for _ in range(4):  # one tile away, so the marker is not hidden by the player
        world.step(DOWN)
    spot = world.player_pos.copy()

    direction = max((UP, DOWN, LEFT, RIGHT), key=walk_distance)
    assert walk_distance(direction) >= 64, "no direction to walk away in"
    for _ in range(40):
        world.step(direction)
    far = world.player_pos.copy()
    assert np.abs(far - spot).max() >= 64  # the marker's tile is off-screen now
    steps = 0
    while not np.array_equal(world.player_pos, spot):
        frame = world.step(OPPOSITE[direction])
        steps += 1
        assert steps <= 200
    assert world.tiles[r, c] == MARKER
    cam = world.player_pos - 28
    y, x = r * 8 - cam[0], c * 8 - cam[1]
    np.testing.assert_array_equal(frame[y:y + 8, x:x + 8], world.atlas[MARKER])


# --------------------------------------------------------------------- batching
def test_batch_matches_single_worlds():
    cfg = OverworldConfig.from_dict(world_dict())
    seeds = [0, 1, 2, 3]
    actions = np.random.default_rng(1).integers(0, NUM_ACTIONS, size=(4, 300))
    batch = BatchOverworld(cfg, 4)
    batch_frames = [batch.reset(seeds)]
    batch_frames += [batch.step(actions[:, t]) for t in range(actions.shape[1])]
    batch_frames = np.stack(batch_frames, axis=1)  # (B, T+1, 64, 64, 3)
    for i, seed in enumerate(seeds):
        single = rollout(Overworld(cfg), seed, actions[i])
        np.testing.assert_array_equal(batch_frames[i], single)


def test_batch_accepts_per_world_atlases():
    cfg = OverworldConfig.from_dict(world_dict())
    rng = np.random.default_rng(0)
    atlases = np.stack([random_tileset(rng) for _ in range(2)])
    frames = BatchOverworld(cfg, 2).reset([5, 5], atlases)
    assert not np.array_equal(frames[0], frames[1])
    world = Overworld(cfg)
    world.set_atlas(atlases[1])
    np.testing.assert_array_equal(world.reset(5), frames[1])


def test_bad_actions_and_seeds_raise():
    batch = BatchOverworld(OverworldConfig.from_dict(world_dict()), 2)
    with pytest.raises(ValueError, match="seeds"):
        batch.reset([0])
    batch.reset([0, 1])
    with pytest.raises(ValueError, match="actions"):
        batch.step(np.array([0, NUM_ACTIONS]))
    with pytest.raises(ValueError, match="actions"):
        batch.step(np.array([0]))


# ------------------------------------------------------------ water and creatures
def test_water_animates():
    cfg = OverworldConfig.from_dict(world_dict(num_creatures=0, map_size=32))
    world = Overworld(cfg)
    found = False
    for seed in range(10):
        for direction in (UP, DOWN, LEFT, RIGHT):
            world.reset(seed)
            for _ in range(60):
                world.step(direction)
                if water_in_view(world):
                    found = True
                    break
            if found:
                break
        if found:
            break
    assert found, "no water came into view"
    period = cfg.water_period
    while world.frame_index % (2 * period):
        world.step(IDLE)
    # frames[i] is frame index i (modulo two periods)
    frames = [world.render()] + [world.step(IDLE) for _ in range(2 * period)]
    np.testing.assert_array_equal(frames[0], frames[period - 1])  # same phase, nothing else moves
    assert not np.array_equal(frames[0], frames[period])  # the other phase
    np.testing.assert_array_equal(frames[period], frames[2 * period - 1])
    np.testing.assert_array_equal(frames[0], frames[2 * period])  # back to the first look


def test_creatures_move_without_entering_blocking_tiles():
    world = make_world()
    frame0 = world.reset(0)
    start = world.creature_pos.copy()
    assert start.shape == (world.cfg.num_creatures, 2)
    frames = [world.step(IDLE) for _ in range(300)]
    assert not np.array_equal(frames[1], frame0)  # creatures move while the player stands still
    assert not np.array_equal(world.creature_pos, start)
    for pos in world.creature_pos:
        assert not overlaps_blocking(world.tiles, pos)
    # Deterministic: the same seed moves them the same way.
    again = make_world()
    again.reset(0)
    for _ in range(300):
        again.step(IDLE)
    np.testing.assert_array_equal(again.creature_pos, world.creature_pos)


def creature_sprites_drawn(world: BatchOverworld) -> list[np.ndarray]:
    """Each creature of world 0 drawn alone on black: (V, V, 3) each."""
    layers = world.render_layers()
    return [np.where(layers.creature_cover[0, k, ..., None], layers.creatures[0, k], 0)
            for k in range(world.cfg.num_creatures)]


def test_creatures_face_where_they_walk():
    """With creature_facing the sprite is the creature tile (which faces up) turned a quarter
    clockwise per compass step of its heading, from the first frame on, and it turns with the
    creature (on the tick it turns, before it moves on); without it, the tile as it is."""
    from dataclasses import replace

    from worlds.overworld.tiles import CREATURE

    cfg = OverworldConfig.from_dict(world_dict())
    assert cfg.creature_facing
    world = BatchOverworld(cfg, 1)
    world.reset([3])
    tile = world._drawn[0][0, CREATURE]  # (T, T, 3): the creature tile as drawn, unturned
    turned = checked = 0
    for _ in range(200):
        heading = world._creatures.direction[0].copy()
        for k, alone in enumerate(creature_sprites_drawn(world)):
            y, x = world.creature_view_pos[0, k]
            if not (0 <= y <= cfg.view - cfg.tile and 0 <= x <= cfg.view - cfg.tile):
                continue
            box = alone[y:y + cfg.tile, x:x + cfg.tile]
            expected = np.rot90(tile, -int(heading[k]))
            opaque = (expected != TRANSPARENT).any(-1)
            np.testing.assert_array_equal(box[opaque], expected[opaque])
            checked += 1
        before = world._creatures.direction.copy()
        world.step(np.array([IDLE]))
        turned += int((world._creatures.direction != before).sum())
    assert checked > 0 and turned > 0  # sprites were seen, and seen to turn
    # one frame tells the heading: the four ways a creature may start draw four first frames
    firsts = []
    for d in range(4):
        world.reset([3])
        world.point_creatures(d)
        firsts.append(world.render())
    assert all(not np.array_equal(firsts[i], firsts[j]) for i in range(4) for j in range(i))
    # without facing, every heading draws the tile unturned: the first frames are one
    hidden = BatchOverworld(replace(cfg, creature_facing=False), 1)
    firsts = []
    for d in range(4):
        hidden.reset([3])
        hidden.point_creatures(d)
        firsts.append(hidden.render())
    assert all(np.array_equal(firsts[0], f) for f in firsts[1:])


def test_creature_facing_defaults_to_false_for_configs_written_before_it():
    d = world_dict()
    del d["creature_facing"]
    assert OverworldConfig.from_dict(d).creature_facing is False
    with pytest.raises(ValueError, match="world.creature_facing must be true or false, got 'yes'"):
        OverworldConfig.from_dict(world_dict(creature_facing="yes"))


# ------------------------------------------------------------- configs and tile sets
def test_world_configs_load_and_have_different_tile_sets():
    atlases = {}
    for name in WORLD_NAMES:
        node = OmegaConf.load(CONF / f"{name}.yaml")
        cfg = OverworldConfig.from_dict(node)
        assert cfg.name == name and cfg.view == 64 and cfg.tile == 8
        world = build_world(node)
        assert isinstance(world, Overworld)
        assert world.reset(0).shape == (64, 64, 3)
        atlases[name] = world.atlas
        assert world.atlas.shape == (NUM_TILES, 8, 8, 3) and world.atlas.dtype == np.uint8
    for i, a in enumerate(WORLD_NAMES):
        for b in WORLD_NAMES[i + 1:]:
            assert not np.array_equal(atlases[a], atlases[b])


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"view": 60}, "view"),
        ({"scroll": 3}, "scroll"),
        ({"tile": 12}, "tile"),
        ({"map_size": 8}, "map_size"),
        ({"map_size": 100000}, r"world.map_size must be an integer in 32..2048, got 100000"),
        ({"num_creatures": -1}, "num_creatures"),
        ({"water_period": 0}, "water_period"),
        ({"family": "dungeon"}, "family"),
        ({"colour_depth": 8}, "colour_depth"),
        ({"scroll": None}, "scroll"),
    ],
)
def test_bad_config_values_raise_naming_the_key(change, expected):
    d = world_dict(**change)
    if change.get("scroll", 0) is None:
        del d["scroll"]
    with pytest.raises(ValueError, match=expected):
        OverworldConfig.from_dict(d)


def test_bad_tile_sets_raise_naming_the_tile():
    d = world_dict()
    d["tileset"]["grass"]["pattern"] = "plaid"
    with pytest.raises(ValueError, match="tileset.grass"):
        OverworldConfig.from_dict(d)
    d = world_dict()
    d["tileset"]["water_a"]["base"] = "#12345"
    with pytest.raises(ValueError, match="tileset.water_a.base"):
        OverworldConfig.from_dict(d)
    d = world_dict()
    del d["tileset"]["bridge"]
    with pytest.raises(ValueError, match="bridge"):
        OverworldConfig.from_dict(d)
    d = world_dict()
    d["tileset"]["rock"]["pattern"] = "slime"  # sprites only
    with pytest.raises(ValueError, match="tileset.rock"):
        OverworldConfig.from_dict(d)


def test_atlas_to_prompt_layout_and_range():
    world = make_world()
    atlas = world.atlas
    prompt = atlas_to_prompt(atlas)
    assert prompt.shape == (PROMPT_TOKENS, PROMPT_DIM) == (256, 12) and prompt.dtype == np.float32
    assert prompt.min() >= -1.0 and prompt.max() <= 1.0
    np.testing.assert_array_equal(world.prompt, prompt)
    for tile, pr, pc in [(0, 0, 0), (5, 1, 2), (15, 3, 3)]:
        patch = atlas[tile, 2 * pr:2 * pr + 2, 2 * pc:2 * pc + 2].reshape(-1)
        np.testing.assert_allclose(prompt[16 * tile + 4 * pr + pc], patch / 127.5 - 1.0, atol=1e-6)
    extremes = atlas_to_prompt(np.stack([np.zeros((8, 8, 3)), np.full((8, 8, 3), 255)] * 8).astype(np.uint8))
    assert extremes.min() == -1.0 and extremes.max() == 1.0
    with pytest.raises(ValueError, match="atlas"):
        atlas_to_prompt(np.zeros((15, 8, 8, 3), dtype=np.uint8))


def test_random_tileset_differs_per_rng_and_keeps_semantics():
    a = random_tileset(np.random.default_rng(0))
    b = random_tileset(np.random.default_rng(0))
    c = random_tileset(np.random.default_rng(1))
    assert a.shape == (NUM_TILES, 8, 8, 3) and a.dtype == np.uint8 and len(TILE_NAMES) == NUM_TILES
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for atlas in (a, c):
        transparent = np.all(atlas == np.array(TRANSPARENT, dtype=np.uint8), axis=-1)  # (16, 8, 8)
        for tile in range(NUM_TILES):
            assert transparent[tile].any() == (tile in SPRITE_TILES)
        assert not np.array_equal(atlas[WATER_A], atlas[WATER_A + 1])


def test_set_atlas_restyles_the_world():
    world = make_world()
    first = world.reset(2)
    world.set_atlas(random_tileset(np.random.default_rng(3)))
    restyled = world.render()
    assert not np.array_equal(first, restyled)
    np.testing.assert_array_equal(world.prompt, atlas_to_prompt(world.atlas))
    assert np.array_equal(world.reset(2), restyled)  # the style is kept across resets


def test_render_creature_moved_draws_one_creature_elsewhere_and_keeps_the_state():
    from worlds.overworld import BatchOverworld, load_config

    w = BatchOverworld(load_config("overworld"), 2)
    w.reset([0, 1])
    frame, pos = w.render(), w.creature_view_pos.copy()
    np.testing.assert_array_equal(w.render_creature_moved(0, np.zeros((2, 2), dtype=np.int64)), frame)
    moved = w.render_creature_moved(0, np.array([[0, 3], [0, 0]]))
    np.testing.assert_array_equal(moved[1], frame[1])  # only world 0's creature moved
    y, x = pos[0, 0]
    if 0 <= y <= 56 and 0 <= x <= 53:  # in view: its box changed
        assert not np.array_equal(moved[0, y:y + 8, x:x + 11], frame[0, y:y + 8, x:x + 11])
    np.testing.assert_array_equal(w.render(), frame)  # the state is as it was
    np.testing.assert_array_equal(w.creature_view_pos, pos)
