"""The frame loop: a producer thread that generates, a fixed clock that presents.

Generation and presentation are decoupled:
- `Producer` runs on its own thread. When there is room for a whole chunk in the
  bounded frame queue it asks the controller for the chunk's actions (as late as
  possible, so input latency stays low), calls `engine.step`, and queues the frames.
- The presenter (the window, on the main thread) takes at most one frame per tick of a
  `FixedClock` and never waits for the producer: an empty queue means the last frame
  is shown again (a stall).
- Reset is an *epoch*: the presenter bumps it, the producer resets the engine and
  controller before its next chunk, and frames of older epochs are dropped.
`run_headless` is the same loop with no thread, no queue and no pacing.
`build_off_main_thread` builds the engine that a `Producer` will run on a thread that
then exits, so that torch's CPU thread pool is the producer's alone.
`GracefulInterrupt` turns the first Ctrl-C into a stop request, so a run always ends
between frames (a recording is never cut mid-frame); a second Ctrl-C aborts.
"""
from __future__ import annotations

import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np


@dataclass
class FrameItem:
    """One frame on its way to the screen, with what the HUD shows about its step."""

    epoch: int
    index: int  # generated frame number since the reset; -1 for the reset frame itself
    action: int | None  # the action that made it (None for the reset frame)
    frame: np.ndarray  # (H, W, 3) uint8
    latency_ms: float = 0.0
    cache_tokens: int | None = None
    memory_mb: float | None = None
    attention: str | None = None  # the attention runtime's one-line summary, when it has one


class Producer:
    """Runs `engine.step` on a thread and feeds a bounded queue of frames."""

    def __init__(self, engine: Any, controller: Any, seed: int, queue_size: int):
        if queue_size < 1:
            raise ValueError(f"window.queue_size must be >= 1, got {queue_size}")
        self.engine = engine
        self.controller = controller
        self.seed = seed
        # The queue must hold at least one chunk: a chunk is queued as a whole.
        self.capacity = max(queue_size, engine.chunk_size)
        self.queue: queue.Queue[FrameItem] = queue.Queue(maxsize=self.capacity)
        self._slots = threading.Semaphore(self.capacity)  # free places in the queue
        self._stop = threading.Event()
        self._epoch = 0  # wanted epoch, set by the presenter
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    @property
    def epoch(self) -> int:
        return self._epoch

    def start(self) -> "Producer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def request_reset(self) -> int:
        """Start a new play-through; frames of the old one are dropped. Returns the new epoch."""
        self._epoch += 1
        return self._epoch

    def get(self) -> FrameItem | None:
        """The next frame of the current epoch, or None if none is ready (never blocks)."""
        if self.error is not None:
            raise RuntimeError("the frame producer failed") from self.error
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return None
            self._slots.release()
            if item.epoch == self._epoch:
                return item

    def _acquire(self, n: int) -> bool:
        """Reserve n queue places; False if stopping or the epoch changed meanwhile."""
        epoch = self._epoch
        taken = 0
        while taken < n:
            if self._stop.is_set() or self._epoch != epoch:
                for _ in range(taken):
                    self._slots.release()
                return False
            if self._slots.acquire(timeout=0.02):
                taken += 1
        return True

    def _put(self, item: FrameItem) -> None:
        self.queue.put_nowait(item)  # a place was reserved, so this never blocks

    def _run(self) -> None:
        try:
            epoch = None
            index = 0
            chunk = self.engine.chunk_size
            while not self._stop.is_set():
                if epoch != self._epoch:
                    # new play-through: reset the engine and the controller
                    if not self._acquire(1):
                        continue
                    epoch = self._epoch
                    first = self.engine.reset(self.seed)
                    self.controller.reset()
                    index = 0
                    self._put(FrameItem(epoch, -1, None, first))
                    continue
                if not self._acquire(chunk):
                    continue
                # read the input at the moment the chunk starts, then generate it
                actions = self.controller.actions(chunk)
                frames = self.engine.step(actions)
                stats = self.engine.stats
                for action, frame in zip(actions, frames):
                    self._put(FrameItem(epoch, index, int(action), frame, float(stats.latency_ms),
                                        stats.cache_tokens, stats.memory_mb, stats.extra.get("hud")))
                    index += 1
        except BaseException as err:  # handed to the presenter, which re-raises it
            self.error = err


T = TypeVar("T")


def build_off_main_thread(build: Callable[[], T]) -> T:
    """`build()` on a short-lived thread; returns its result or raises its exception.

    For an engine that a `Producer` thread will run. Torch runs a CPU op in parallel on an
    OpenMP team that belongs to the calling thread, and GNU OpenMP (the Linux wheels) keeps
    that team for as long as the thread lives. An engine built on the main thread (loading
    weights runs parallel copies) leaves the main thread a team of idle workers; once the
    producer has its own, there are more OpenMP threads than cores, and GNU OpenMP then lets
    idle workers sleep after a few spins instead of spinning, so each of the many small ops
    of a step waits for its worker to wake. On the 2-core development CPU a step on the
    producer thread took 1.12x (`preset=fast`) and 1.14x (the default) as long with the
    engine built on the main thread (`python -m runtime.thread_bench`; BENCHMARKS.md,
    "Optimization log"). A thread that exits takes its team with it.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = build()
        except BaseException as err:  # re-raised on the calling thread, as it was raised
            box["error"] = err

    thread = threading.Thread(target=target, name="build", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class FixedClock:
    """Ticks at a fixed rate against absolute deadlines, so errors do not accumulate.

    If a tick comes more than one period late the schedule restarts from now rather
    than rushing to catch up (which would show frames in a burst).

    It waits by sleeping only, never by spinning: a busy-wait before each deadline holds
    the GIL and a core that the producer thread needs (on a 2-core CPU a 2 ms spin per
    tick cost the neural engine frames in play: BENCHMARKS.md, pacing), and the operating
    system's wake-up delay is far below a frame period.
    """

    def __init__(self, fps: float, now: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep):
        if fps <= 0:
            raise ValueError(f"window.fps must be > 0, got {fps}")
        self.period = 1.0 / fps
        self._now, self._sleep = now, sleep
        self.deadline = now() + self.period
        self.late_ticks = 0

    def wait(self) -> float:
        """Sleep until the next deadline; returns the time it woke."""
        now = self._now()
        if now - self.deadline > self.period:
            self.late_ticks += 1
            self.deadline = now
        while now < self.deadline:  # a loop only in case a sleep returns early
            self._sleep(self.deadline - now)
            now = self._now()
        self.deadline += self.period
        return now


def run_headless(engine: Any, controller: Any, seed: int, max_frames: int | None,
                 on_frame: Callable[[int, int, np.ndarray], None],
                 should_stop: Callable[[], bool] = lambda: False) -> int:
    """Generate frames with no window and no pacing; returns the number generated.

    `on_frame(index, action, frame)` sees every generated frame (not the reset frame).
    Stops at `max_frames` (None: never) or when `should_stop()` says so between chunks.
    """
    engine.reset(seed)
    controller.reset()
    count = 0
    while (max_frames is None or count < max_frames) and not should_stop():
        actions = controller.actions(engine.chunk_size)
        frames = engine.step(actions)
        for action, frame in zip(actions, frames):
            if max_frames is not None and count >= max_frames:
                break
            on_frame(count, int(action), frame)
            count += 1
    return count


class GracefulInterrupt:
    """Context manager: the first SIGINT or SIGTERM (Ctrl-C, `kill`, `timeout`) sets
    `requested` and `signum` (its number), so the run stops between frames and closes its
    recording; a second one raises KeyboardInterrupt (`runtime.cli.Terminated` for
    SIGTERM, so the exit code still says which signal it was).

    Only installs itself on the main thread (signal handlers live there).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGINT.value
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            from runtime.cli import Terminated

            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.requested = True
        self.signum = int(signum)

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            if previous is not None:  # None: a handler from outside Python, which cannot be put back
                signal.signal(s, previous)
        self._previous = {}

    def __call__(self) -> bool:
        return self.requested


@dataclass
class HeadlessConfig:
    """`window=headless`: no display, no pacing; frames go only to the recorder."""

    kind: str = "headless"
