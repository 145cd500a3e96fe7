"""Recording a play-through: DIR/video.mp4, DIR/actions.jsonl and DIR/meta.json.

- video.mp4: the generated frames (not the reset frame), H.264 at `fps`.
- actions.jsonl: one JSON object per frame, `{"frame": i, "action": "right",
  "action_id": 4}`, where frame i was made by action i; flushed line by line.
- meta.json: whatever the caller describes the run with (resolved config, seed, engine
  info, ...) plus `start_time` and `num_frames`; written at the start and rewritten
  when the recording closes.

A recording is always left playable: `close()` finishes the MP4 even after an
exception, and the ffmpeg encoder runs in its own process group, so a Ctrl-C from the
terminal reaches only this process, which stops between frames (see
`runtime.loop.GracefulInterrupt`) and closes the file. The video and the action log
always hold the same number of frames. The one exception is a disk that fills up: the
MP4 cannot be finished without room, but the action log, written line by line, keeps
every recorded frame's action, and a replay plays it (meta.json then still says
`complete: false`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from worlds.actions import ACTIONS


class Recorder:
    """Writes one recording directory; use as a context manager or call close()."""

    def __init__(self, path: str | Path, fps: float, meta: dict[str, Any], quality: float = 9.0):
        import imageio.v2 as imageio

        if fps <= 0:
            raise ValueError(f"record.fps must be > 0, got {fps}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self.meta["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.meta["num_frames"] = 0
        self.meta["complete"] = False
        self.num_frames = 0
        self._write_meta()
        self._actions = open(self.path / "actions.jsonl", "w")
        try:
            # imageio starts ffmpeg in its own process group (a terminal Ctrl-C does not
            # reach it); quality 9 of 10 is crf 5: near-lossless for pixel art.
            self._video = imageio.get_writer(
                self.path / "video.mp4", format="FFMPEG", mode="I", fps=fps, codec="libx264",
                quality=quality, macro_block_size=1, pixelformat="yuv420p", ffmpeg_log_level="error",
            )
        except BaseException:
            self._actions.close()
            raise
        self.closed = False

    def write(self, action: int, frame: np.ndarray) -> None:
        """Append one generated frame and the action that made it."""
        self._video.append_data(frame)
        row = {"frame": self.num_frames, "action": ACTIONS[action], "action_id": int(action)}
        self._actions.write(json.dumps(row) + "\n")
        self._actions.flush()
        self.num_frames += 1

    def close(self) -> None:
        """Finish the MP4 and rewrite meta.json with the final frame count."""
        if self.closed:
            return
        self.closed = True
        finished = False
        try:
            try:
                self._actions.close()
            finally:  # the video is finished even when the action log cannot be
                self._video.close()
            finished = True
        finally:  # a video that could not be finished (a full disk) is not called complete
            self.meta["num_frames"] = self.num_frames
            self.meta["complete"] = finished
            self._write_meta()

    def _write_meta(self) -> None:
        tmp = self.path / "meta.json.tmp"
        try:
            tmp.write_text(json.dumps(self.meta, indent=2, default=str) + "\n")
            tmp.replace(self.path / "meta.json")
        except OSError:  # a full disk: the last meta.json stays, no half-written one is left
            tmp.unlink(missing_ok=True)
            raise

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Recording:
    """Recording on/off for a run: what the frame loop and the window call.

    `start(path)` opens a Recorder (a fresh play-through must follow: the caller
    resets the engine), `on_frame` feeds it, `stop()` closes it. Recordings started
    without a path go to `root/YYYYmmdd-HHMMSS`.
    """

    def __init__(self, fps: float, meta: Callable[[], dict[str, Any]], root: str | Path = "recordings"):
        self.fps = fps
        self.meta = meta
        self.root = Path(root)
        self.recorder: Recorder | None = None
        self.last_path: Path | None = None

    @property
    def active(self) -> bool:
        return self.recorder is not None

    def start(self, path: str | Path | None = None) -> Path:
        self.stop()
        if path is None:
            path = self.root / time.strftime("%Y%m%d-%H%M%S")
            while path.exists():
                path = Path(f"{path}-1")
        self.recorder = Recorder(path, self.fps, self.meta())
        self.last_path = self.recorder.path
        return self.recorder.path

    def on_frame(self, action: int, frame: np.ndarray) -> None:
        if self.recorder is not None:
            self.recorder.write(action, frame)

    def stop(self) -> int | None:
        """Close the open recording; returns its frame count (None if none was open)."""
        if self.recorder is None:
            return None
        recorder, self.recorder = self.recorder, None
        recorder.close()
        return recorder.num_frames
