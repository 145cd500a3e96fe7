"""The presenter's clock and the pacing benchmark's report (behaviour, not speed)."""
from __future__ import annotations

import pytest

from runtime.loop import FixedClock, build_off_main_thread


class FakeTime:
    """A clock that only moves when slept on; counts the calls a clock makes."""

    def __init__(self, start: float = 100.0):
        self.t = start
        self.reads = 0
        self.sleeps: list[float] = []

    def now(self) -> float:
        self.reads += 1
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def test_clock_sleeps_to_each_deadline_without_spinning():
    fake = FakeTime()
    clock = FixedClock(25.0, now=fake.now, sleep=fake.sleep)
    fake.t += 0.01  # the tick's work took 10 ms
    reads = fake.reads
    woke = clock.wait()
    assert woke == pytest.approx(100.04)
    assert fake.sleeps == [pytest.approx(0.03)]  # one sleep for the whole remainder
    assert fake.reads - reads == 2  # read before and after the sleep: no busy-wait
    for k in range(2, 6):  # deadlines are absolute: no drift over ticks
        fake.t += 0.005
        assert clock.wait() == pytest.approx(100.0 + 0.04 * k)
    assert clock.late_ticks == 0


def test_clock_sleeps_again_when_a_sleep_returns_early():
    fake = FakeTime()
    early = iter([0.5, 1.0])  # the first sleep gives back only half the time asked
    clock = FixedClock(10.0, now=fake.now, sleep=lambda s: fake.sleep(s * next(early)))
    assert clock.wait() == pytest.approx(100.1)
    assert fake.sleeps == [pytest.approx(0.05), pytest.approx(0.05)]


def test_clock_restarts_its_schedule_after_a_long_delay():
    fake = FakeTime()
    clock = FixedClock(10.0, now=fake.now, sleep=fake.sleep)
    fake.t += 0.35  # three periods late: show now, do not rush through the missed ticks
    assert clock.wait() == pytest.approx(100.35)
    assert fake.sleeps == [] and clock.late_ticks == 1
    assert clock.wait() == pytest.approx(100.45)  # then steady again from there


def test_clock_rejects_a_bad_rate():
    with pytest.raises(ValueError, match="window.fps"):
        FixedClock(0)


def test_pacing_bench_arguments():
    from runtime.pacing_bench import parse_args

    args = parse_args(["seconds=100", "warmup=2", "alone=0", "engine=simulator"])
    assert (args.seconds, args.warmup, args.alone, args.overrides) == (100.0, 2.0, 0.0, ["engine=simulator"])
    assert parse_args([]).alone > 0  # the engine alone is measured by default, for comparison
    with pytest.raises(ValueError, match="alone"):
        parse_args(["alone=x"])
    with pytest.raises(ValueError, match="seconds"):
        parse_args(["seconds=0"])


def test_pacing_bench_reports_new_frames_and_the_engine_rate(capsys):
    pytest.importorskip("pygame")
    from runtime.pacing_bench import main

    result = main(["seconds=0.5", "warmup=0.1", "alone=0.1", "engine=simulator", "window.fps=60"])
    assert "\nsetup: commit " in capsys.readouterr().out  # the report says what it measured
    for key in ("engine_fps_alone", "presented_fps", "new_fps", "engine_fps_in_play", "step_p50_ms",
                "p99_over_p50", "stalls", "frames"):
        assert key in result
    # every presented tick either showed a new frame or re-showed the last one (a stall)
    assert 0 < result["new_fps"] <= result["presented_fps"] * 1.0001
    assert result["engine_fps_in_play"] > 0 and result["engine_fps_alone"] > 0


def test_build_off_main_thread_returns_the_result_built_on_another_thread():
    import threading

    built_on = build_off_main_thread(threading.current_thread)
    assert built_on is not threading.main_thread()
    assert not built_on.is_alive()  # the thread, and with it its thread pool, is gone


def test_build_off_main_thread_raises_the_builders_error_unchanged():
    def bad() -> None:
        raise ValueError("engine.checkpoint 'x.safetensors' does not exist")

    with pytest.raises(ValueError, match="engine.checkpoint 'x.safetensors' does not exist"):
        build_off_main_thread(bad)


def test_thread_bench_arguments():
    from runtime.thread_bench import parse_args

    assert parse_args(["rounds=2", "warmup=0", "preset=fast"]) == ({"rounds": 2, "steps": 60, "warmup": 0}, ["preset=fast"])
    for bad in ["rounds=0", "steps=x", "warmup=-1"]:
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            parse_args([bad])


@pytest.mark.parametrize("mode", ["main", "off_main"])
def test_thread_bench_times_steps_on_a_producer_thread(mode):
    from runtime.thread_bench import child

    assert child(mode, steps=3, warmup=1, overrides=["engine=simulator"]) > 0
    with pytest.raises(ValueError, match="'sideways'"):
        child("sideways", steps=1, warmup=0, overrides=["engine=simulator"])
