"""The long-rollout benchmark: what it records, where it stops, both model sources."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose

from runtime.bench import plot, run

pytestmark = pytest.mark.usefixtures("one_thread")

ROW_KEYS = {"frame", "latency_ms", "fps", "cache_tokens", "peak_mem_mb"}
FASTAR = "fastar:budget_frames=4;merge_target=0.5;density=0.5"


def tiny_random(overrides: list[str]):
    return compose(["model=tiny", "device=cpu", "engine.dtype=float32", "bench.progress=false", "bench.warmup=2",
                    *overrides], config_name="bench_wan")


def test_random_weight_run_records_every_frame_and_bounds_the_budgeted_caches(tmp_path):
    cfg = tiny_random(["bench.frames=12", f"bench.attentions=[dense,window,'{FASTAR}']"])
    res = run(cfg, tmp_path)
    plot(res, tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["device"] == "cpu" and saved["source"] == "random" and saved["model"]["width"] == 64
    assert set(saved["configs"]) == {"dense", "window", FASTAR}
    for c in saved["configs"].values():
        assert [r["frame"] for r in c["rows"]] == list(range(1, 13))
        assert all(set(r) == ROW_KEYS and r["latency_ms"] > 0 for r in c["rows"])
        assert c["stopped_at"] is None and c["total_s"] > 0
    n = 64  # tokens per frame of the tiny model
    dense = [r["cache_tokens"] for r in saved["configs"]["dense"]["rows"]]
    assert dense == [n * f for f in range(1, 13)]  # every frame kept: grows linearly
    fastar = [r["cache_tokens"] for r in saved["configs"][FASTAR]["rows"]]
    assert max(fastar) <= 4 * n and fastar[-1] == 4 * n  # full, never over the budget
    window = [r["cache_tokens"] for r in saved["configs"]["window"]["rows"]]
    assert window[-1] == min(12, 1 + 20) * n
    for name in ("fps.png", "memory.png", "cache_tokens.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_a_config_stops_when_its_chunks_take_longer_than_the_limit(tmp_path):
    cfg = tiny_random(["bench.frames=50", "bench.attentions=[dense]", "bench.max_chunk_ms=0.0001"])
    res = run(cfg, tmp_path)
    stop = res["configs"]["dense"]["stopped_at"]
    assert stop["frame"] == 3 and "bench.max_chunk_ms" in stop["reason"]  # the first chunk after warm-up
    assert len(res["configs"]["dense"]["rows"]) == 3
    assert res["summary"]["dense"]["stopped_at"] == stop


def test_checkpoint_source_plays_the_world_with_the_shipped_model(tmp_path):
    cfg = compose(["device=cpu", "bench.progress=false", "bench.warmup=1", "bench.frames=3", "bench.attentions=[window]"],
                  config_name="bench")
    res = run(cfg, tmp_path)
    assert res["source"] == "checkpoint" and res["model"]["frame_size"] == 64
    assert len(res["configs"]["window"]["rows"]) == 3


def test_an_unknown_source_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="bench.source='nowhere'"):
        run(tiny_random(["bench.source=nowhere"]), tmp_path)


@pytest.mark.parametrize("override, needle", [
    ("bench.frames=abc", "bench.frames must be an integer >= 1, got 'abc'"),
    ("bench.warmup=-1", "bench.warmup must be an integer >= 0, got -1"),
    ("bench.max_chunk_ms=fast", "bench.max_chunk_ms must be a number, got 'fast'"),
    ("bench.attentions=[dense,fastr]", "unknown attention config 'fastr'"),
    ("bench.lockstep=maybe", "bench.lockstep must be true or false, got 'maybe'"),
    ("bench.progress=1", "bench.progress must be true or false, got 1"),
    ("out=README.md/x", "out 'README.md/x' cannot be a directory: 'README.md' is a file"),
    ("bench.attentions=[dense,'window:window_frames=2.5']",
     "bench.attentions entry 'window:window_frames=2.5': attention.window_frames must be an integer, got 2.5"),
])
def test_bad_settings_fail_before_any_config_runs(override, needle):
    """A bad setting, even of the last config, is reported before the first one runs."""
    from runtime.bench import check

    with pytest.raises(ValueError) as err:
        check(tiny_random([override]))
    assert needle in str(err.value)


def test_the_simulator_has_no_model_to_bench():
    from runtime.bench import check

    with pytest.raises(ValueError, match="engine=simulator has no model to measure here; expected engine=neural"):
        check(compose(["engine=simulator"], config_name="bench"))


def test_plot_from_names_a_file_that_is_not_a_bench_json(tmp_path):
    from runtime.bench import read_bench

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "eval.json").write_text('{"next_psnr": 40}')
    with pytest.raises(ValueError, match=r"bench.plot_from '.*notes.txt' is not JSON"):
        read_bench(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match=r"bench.plot_from '.*eval.json' is not a bench.json \(it has no 'configs'\)"):
        read_bench(str(tmp_path / "eval.json"))


def test_an_interrupted_config_keeps_what_it_measured(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) in the middle of a config: its rows so far are handed to the
    progress callback, stopped at the last frame measured, reason "interrupted", and the
    interrupt goes on up."""
    from runtime import bench
    from runtime.bench import build_source, run_configs

    cfg = tiny_random(["bench.frames=50", "bench.attentions=[window]"])
    world, model, device, _ = build_source(cfg)
    step = bench.ConfigRun.step

    def interrupted_at_7(self, i, a):
        if i == 7:
            raise KeyboardInterrupt
        step(self, i, a)

    monkeypatch.setattr(bench.ConfigRun, "step", interrupted_at_7)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        run_configs(model, cfg, ["window"], world, [0] * 50, device,
                    on_progress=lambda name, rows, stopped: seen.append((name, len(rows), stopped)))
    assert seen == [("window", 7, {"frame": 7, "reason": "interrupted"})]


def test_the_wan_shape_on_a_cpu_is_refused_before_its_weights_are_made():
    from runtime.bench import build_source

    with pytest.raises(ValueError, match="about 849M parameters .* needs a GPU.*model=tiny"):
        build_source(compose(["device=cpu"], config_name="bench_wan"))


def test_progress_is_saved_while_a_config_runs(tmp_path):
    from runtime.bench import build_source, run_configs

    cfg = tiny_random(["bench.frames=400", "bench.attentions=[window]"])
    world, model, device, _ = build_source(cfg)
    seen = []
    res = run_configs(model, cfg, ["window"], world, [0] * 400, device,
                      on_progress=lambda name, rows, stopped: seen.append(len(rows)))["window"]
    assert seen == [200, 400] and len(res["rows"]) == 400


def test_a_config_is_measured_after_the_previous_configs_rollout_is_freed(tmp_path, monkeypatch):
    """A rollout that played from a CUDA graph is a reference cycle; its caches must not
    count in the next config's peak memory. Here every rollout is made cyclic and the
    automatic collector is off, so only the bench's own collection can free them."""
    import gc
    import weakref

    import runtime.bench as bench

    made, alive_at_reset = [], []
    build = bench.build_rollout

    def cyclic_rollout(*args, **kwargs):
        rollout = build(*args, **kwargs)
        rollout.self_ref = rollout  # as rollout.graph.rollout is on a GPU
        made.append(weakref.ref(rollout))
        return rollout

    reset = bench.reset_peak

    def checking_reset(device):
        alive_at_reset.append(sum(r() is not None for r in made[:-1]))  # earlier configs' rollouts
        reset(device)

    monkeypatch.setattr(bench, "build_rollout", cyclic_rollout)
    monkeypatch.setattr(bench, "reset_peak", checking_reset)
    cfg = tiny_random(["bench.frames=3", f"bench.attentions=[window,'{FASTAR}',dense]"])
    gc.disable()
    try:
        run(cfg, tmp_path)
    finally:
        gc.enable()
    assert len(made) == 3 and alive_at_reset == [0, 0, 0]


def test_lockstep_advances_every_config_in_turn_and_measures_the_same_rollouts(tmp_path, monkeypatch):
    import runtime.bench as bench

    names = ["window", FASTAR]
    for d in ("seq", "lock"):
        (tmp_path / d).mkdir()
    seq = run(tiny_random(["bench.frames=6", f"bench.attentions=[window,'{FASTAR}']"]), tmp_path / "seq")
    order = []
    step = bench.ConfigRun.step

    def recording_step(self, i, action):
        order.append((i, self.name))
        step(self, i, action)

    monkeypatch.setattr(bench.ConfigRun, "step", recording_step)
    lock = run(tiny_random(["bench.frames=6", f"bench.attentions=[window,'{FASTAR}']", "bench.lockstep=true"]),
               tmp_path / "lock")
    # one chunk each per frame, the first config rotating from frame to frame
    assert order == [(i, n) for i in range(6) for n in names[i % 2:] + names[: i % 2]]
    assert lock["lockstep"] is True and seq["lockstep"] is False
    assert set(lock["lockstep_ratios"]) == {f"window / {FASTAR}"} and "lockstep_ratios" not in seq
    for n in names:
        rows = lock["configs"][n]["rows"]
        assert [r["frame"] for r in rows] == list(range(1, 7)) and all(set(r) == ROW_KEYS for r in rows)
        assert [r["cache_tokens"] for r in rows] == [r["cache_tokens"] for r in seq["configs"][n]["rows"]]
        assert lock["configs"][n]["stopped_at"] is None


def test_lockstep_ratios_cancel_a_drift_that_hits_both_configs():
    from runtime.bench import lockstep_ratios

    def rows(scale):  # the machine slows down 3x over the run; config "a" always costs twice "b"
        return [{"frame": f, "latency_ms": scale * (10 + 20 * f / 900)} for f in range(1, 901)]

    res = {"configs": {"a": {"rows": rows(2.0)}, "b": {"rows": rows(1.0)}}}
    r = lockstep_ratios(res)["a / b"]
    assert r["frames"] == 900
    assert r["at_100"] == r["at_end"] == r["span_300_min"] == r["span_300_max"] == 2.0
    res["configs"]["a"]["rows"][-1]["latency_ms"] *= 10  # one slow chunk does not move the medians
    assert lockstep_ratios(res)["a / b"]["at_end"] == 2.0


def test_lockstep_stops_a_slow_config_and_goes_on_with_the_others(tmp_path, monkeypatch):
    import runtime.bench as bench

    class Clock:  # the bench's clock: dense's chunks take 0.3 s on it, everything else ~0
        now = 0.0

        def perf_counter(self) -> float:
            self.now += 1e-6
            return self.now

        def time(self) -> float:
            return self.now

    clock = Clock()
    build = bench.build_rollout

    def slow_dense(model, cfg, batch, attention):
        rollout = build(model, cfg, batch=batch, attention=attention)
        if attention.name == "dense":
            step = rollout.step

            def slow(a):
                clock.now += 0.3
                return step(a)
            rollout.step = slow
        return rollout

    monkeypatch.setattr(bench, "build_rollout", slow_dense)
    monkeypatch.setattr(bench, "time", clock)
    cfg = tiny_random(["bench.frames=8", "bench.attentions=[dense,window]", "bench.lockstep=true",
                       "bench.max_chunk_ms=250"])
    res = run(cfg, tmp_path)
    dense, window = res["configs"]["dense"], res["configs"]["window"]
    assert dense["stopped_at"]["frame"] == 3 and len(dense["rows"]) == 3  # the first chunk after warm-up
    assert window["stopped_at"] is None and [r["frame"] for r in window["rows"]] == list(range(1, 9))
    assert window["total_s"] < 0.9 <= dense["total_s"]  # each config's own time, not the whole run's
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved["configs"]) == {"dense", "window"}


def test_every_default_attention_of_both_bench_configs_is_a_valid_variant():
    from runtime.evaluate import attention_cfg
    from runtime.sparse import AttentionConfig

    for name in ("bench", "bench_wan"):
        for spec in compose([], config_name=name).bench.attentions:
            AttentionConfig.from_dict(attention_cfg(str(spec)))


def run_profile_step(out, *args: str) -> dict:
    """`python -m runtime.profile_step` of the tiny Wan-shaped model on the CPU, in process."""
    import sys

    from runtime import profile_step

    argv = ["profile_step", "--config", "bench_wan", "--attentions", f"window|{FASTAR}", *args, "--out", str(out),
            "model=tiny", "device=cpu", "engine.dtype=float32"]
    old, sys.argv = sys.argv, argv
    try:
        profile_step.main()
    finally:
        sys.argv = old
    return json.loads(out.read_text())


def test_profile_step_reports_where_each_configs_frames_go(tmp_path):
    res = run_profile_step(tmp_path / "profile.json", "--frames", "6", "--profile", "2")
    assert res["device"] == "cpu" and set(res["specs"]) == {"window", FASTAR}
    for r in res["specs"].values():
        assert r["median_ms"] > 0 and r["profiled_ms_per_frame"] > 0 and r["top"]
        assert all(t["ms_per_frame"] > 0 and t["calls_per_frame"] > 0 for t in r["top"])
    assert res["specs"][FASTAR]["cache_tokens"] == 4 * 64  # the tiny model's budget, full
    assert res["specs"]["window"]["cache_tokens"] == (6 + 2) * 64  # every frame run and profiled


def test_profile_step_interleaved_runs_the_configs_side_by_side(tmp_path):
    """--interleave N: both rollouts advance frame by frame in turn, and each config's
    profile adds up N rounds of --profile frames."""
    res = run_profile_step(tmp_path / "profile.json", "--frames", "6", "--profile", "1", "--interleave", "3")
    assert res["interleave"] == 3 and set(res["specs"]) == {"window", FASTAR}
    for r in res["specs"].values():
        assert r["median_ms"] > 0 and r["profiled_ms_per_frame"] > 0 and r["top"]
    assert res["specs"]["window"]["cache_tokens"] == (6 + 3) * 64  # 6 frames, then 3 rounds of 1
    assert res["specs"][FASTAR]["cache_tokens"] == 4 * 64


def test_merged_profiles_add_up_times_and_calls_per_operator():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from runtime.profile_step import merged_profile, summarize

    def event(key, ms, count):
        return SimpleNamespace(key=key, device_type=DeviceType.CPU, device_time_total=0.0,
                               self_cpu_time_total=ms * 1e3, count=count)

    first = [event("aten::addmm", 10.0, 62), event("aten::mul", 2.0, 150)]
    second = [event("aten::addmm", 14.0, 62), event("aten::cat", 1.0, 31)]
    res = summarize(merged_profile([first, second]), 4, False, 10, "frame")
    top = {t["name"]: t for t in res["top"]}
    assert top["aten::addmm"]["ms_per_frame"] == pytest.approx(24.0 / 4)
    assert top["aten::addmm"]["calls_per_frame"] == pytest.approx(124 / 4)
    assert top["aten::mul"]["calls_per_frame"] == pytest.approx(150 / 4) and "aten::cat" in top
    assert res["host_ms_per_frame"] == pytest.approx(27.0 / 4)


def test_the_gpu_summary_counts_each_kernel_once():
    """On a GPU the summary adds up the device's own events. A kernel's launcher on the
    host, an autograd node and an operator carry the same device time again (a training
    step's profile listed its attention kernel twice and a compiled region's backward on
    top), and an annotation's device-side range spans kernels already counted."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from runtime.profile_step import summarize

    def event(key, device_type, device_ms, count=1, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, device_time_total=device_ms * 1e3, count=count,
                               self_cpu_time_total=0.0 if device_type == DeviceType.CUDA else 100.0,
                               is_user_annotation=annotation)

    events = [
        event("triton_tem_fused_flex_attention_backward", DeviceType.CUDA, 26.0, 8),  # the kernel
        event("triton_tem_fused_flex_attention_backward", DeviceType.CPU, 26.0, 8),  # its launcher
        event("CompiledFunctionBackward", DeviceType.CPU, 60.0, 8),
        event("autograd::engine::evaluate_function: CompiledFunctionBackward", DeviceType.CPU, 60.0, 8),
        event("aten::mm", DeviceType.CPU, 4.0, 49),
        event("nvjet_sm90_tst_128x256", DeviceType.CUDA, 4.0, 49),
        event("Memcpy HtoD (Pageable -> Device)", DeviceType.CUDA, 0.5, 2),
        event("## Call CompiledFxGraph ##", DeviceType.CUDA, 70.0, 8, annotation=True),
        event("cudaLaunchKernel", DeviceType.CPU, 0.0, 300),
    ]
    prof = SimpleNamespace(key_averages=lambda: events)
    res = summarize(prof, 2, True, 10, "step")
    assert res["profiled_ms_per_step"] == pytest.approx((26.0 + 4.0 + 0.5) / 2)
    assert [t["name"] for t in res["top"]] == ["triton_tem_fused_flex_attention_backward", "nvjet_sm90_tst_128x256",
                                               "Memcpy HtoD (Pageable -> Device)"]
    assert res["top"][0]["calls_per_step"] == 4.0
    assert res["host_ms_per_step"] == pytest.approx(5 * 100.0 / 2 / 1e3)  # the five host events


def test_the_bench_records_the_cpu_attention_kernel_it_ran(tmp_path):
    from runtime.attention import cpu_attention_kernel, set_cpu_attention

    before = cpu_attention_kernel()
    try:
        for kernel in ("sdpa", "matmul"):
            res = run(tiny_random(["bench.frames=3", "bench.attentions=[window]", f"engine.cpu_attention={kernel}"]), tmp_path)
            assert res["cpu_attention"] == kernel == cpu_attention_kernel()
    finally:
        set_cpu_attention(before)


def test_the_commit_recorded_says_when_the_tree_differs_from_it(tmp_path):
    """commit_id: the short HEAD of the checkout holding the code, with "+changes" while a
    tracked file differs from it; untracked files do not count."""
    import importlib.util
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    (tmp_path / "runtime").mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "runtime" / "bench.py", tmp_path / "runtime" / "bench.py")

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", "runtime/bench.py")
    git("commit", "-q", "-m", "one")
    spec = importlib.util.spec_from_file_location("bench_copy", tmp_path / "runtime" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert module.commit_id() == head
    with open(tmp_path / "runtime" / "bench.py", "a") as f:
        f.write("# changed\n")
    assert module.commit_id() == f"{head}+changes"
