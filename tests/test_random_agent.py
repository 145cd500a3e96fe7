"""The random exploring agent: shapes, determinism, valid ids, revisits."""
from __future__ import annotations

import numpy as np
import pytest

from controllers.random_agent import RandomAgentController, explore_actions, inverse_actions
from worlds.actions import IDLE, NUM_ACTIONS, PLACE


def has_revisit(stream: np.ndarray, min_len: int = 12) -> bool:
    """Whether some stretch of >= min_len actions, turning at least once, walks the
    actions just before it backwards (each move inverted, in reverse order)."""
    inverse = inverse_actions(stream)
    for start in range(min_len, len(stream) - min_len + 1):
        span = min(start, len(stream) - start)
        ahead = stream[start:start + span]
        back = inverse[start - span:start][::-1]
        matched = span if np.array_equal(ahead, back) else int(np.argmin(ahead == back))
        moves = ahead[:matched][~np.isin(ahead[:matched], (IDLE, PLACE))]
        if matched >= min_len and len(np.unique(moves)) >= 2:
            return True
    return False


def test_shapes_dtype_and_valid_ids():
    actions = explore_actions(np.random.default_rng(0), 16, 300)
    assert actions.shape == (16, 300) and actions.dtype == np.int64
    assert actions.min() >= 0 and actions.max() < NUM_ACTIONS
    assert set(np.unique(actions)) == set(range(NUM_ACTIONS))  # every action shows up


def test_deterministic_per_generator_state():
    a = explore_actions(np.random.default_rng(5), 4, 200)
    b = explore_actions(np.random.default_rng(5), 4, 200)
    c = explore_actions(np.random.default_rng(6), 4, 200)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # streams of a batch differ


def test_moves_are_held_for_a_while():
    stream = explore_actions(np.random.default_rng(0), 1, 2000)[0]
    changes = np.count_nonzero(np.diff(stream))
    assert changes < len(stream) / 3


def test_streams_contain_revisits():
    actions = explore_actions(np.random.default_rng(0), 8, 512)
    assert all(has_revisit(stream) for stream in actions)
    without = explore_actions(np.random.default_rng(0), 8, 512, p_revisit=0.0)
    assert not any(has_revisit(stream) for stream in without)


def test_bad_arguments_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="min_hold"):
        explore_actions(rng, 1, 10, min_hold=5, max_hold=4)
    with pytest.raises(ValueError, match="p_idle"):
        explore_actions(rng, 1, 10, p_idle=0.5, p_place=0.5, p_revisit=0.5)
    with pytest.raises(ValueError, match="batch"):
        explore_actions(rng, 0, 10)


def test_controller_interface_and_reset():
    agent = RandomAgentController(seed=3)
    first = agent.actions(50) + agent.actions(400)
    assert len(first) == 450 and all(isinstance(a, int) and 0 <= a < NUM_ACTIONS for a in first)
    agent.reset()
    assert agent.actions(450) == first
    assert RandomAgentController(seed=4).actions(450) != first
    assert agent.actions(0) == []
