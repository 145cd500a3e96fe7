from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

from runtime.compare import paired, read_evaluation, table

RESULTS = REPO / "docs" / "results"


def evaluation(**per_seed: list[float]) -> dict:
    """An evaluation's JSON as runtime.evaluate writes it, with these per-seed scores."""
    n = len(next(iter(per_seed.values())))
    res = {"world": "overworld", "sequences": n, "seeds": [0, n - 1], "copy_last_psnr_16": 14.0}
    for key, scores in per_seed.items():
        res[key] = sum(scores) / n
        res[f"{key}_per_seed"] = scores
    return res


def test_paired_differences_are_per_walk():
    new = evaluation(next_psnr=[41.0, 42.0, 44.0], rollout_psnr_16=[20.0, 21.0, 22.0])
    old = evaluation(next_psnr=[40.0, 42.0, 41.0], rollout_psnr_16=[20.5, 21.5, 22.5])
    rows = {r["key"]: r for r in paired(new, old)}
    assert list(rows) == ["next_psnr", "rollout_psnr_16"]
    r = rows["next_psnr"]  # differences 1, 0, 3
    assert r["new"] == pytest.approx(127 / 3) and r["old"] == pytest.approx(41.0)
    assert r["difference"] == pytest.approx(4 / 3)
    assert r["sem"] == pytest.approx(math.sqrt(7 / 9))  # sample variance 7/3 over 3 walks
    assert (r["higher"], r["walks"]) == (2, 3)
    # the same difference on every walk: no spread however far apart the walks are
    r = rows["rollout_psnr_16"]
    assert r["difference"] == pytest.approx(-0.5) and r["sem"] == pytest.approx(0.0) and r["higher"] == 0
    assert [r["key"] for r in paired(new, old, ["rollout_psnr_16"])] == ["rollout_psnr_16"]
    assert "| next_psnr | 42.33 | 41.00 | +1.33 (0.88; 2 of 3) |" in table(paired(new, old))
    one = paired(evaluation(next_psnr=[41.0]), evaluation(next_psnr=[40.0]))
    assert one[0]["sem"] is None and "+1.00 (n/a; 1 of 1)" in table(one)


def test_the_model_cards_paired_figures_are_the_tools():
    """Stage 22 against stage 21 on the 64 held-out walks, as the model card gives them."""
    rows = paired(read_evaluation(str(RESULTS / "stage22" / "cpu_eval_64.json"), "new"),
                  read_evaluation(str(RESULTS / "stage21" / "cpu_eval_64.json"), "old"),
                  ["next_psnr", "rollout_psnr_16", "rollout_psnr_mean_16"])
    got = [(round(r["difference"], 2), round(r["sem"], 2), r["higher"]) for r in rows]
    assert got == [(0.40, 0.02, 64), (0.14, 0.03, 49), (0.41, 0.04, 63)]


@pytest.mark.parametrize("change, needle", [
    ({"seeds": [1, 3]}, "the evaluations differ in seeds: new [1, 3], old [0, 2]"),
    ({"world": "overworld_snow"}, "the evaluations differ in world"),
    ({"copy_last_psnr_16": 15.0}, "repeat-last baselines differ (copy_last_psnr_16: new 15.0, old 14.0)"),
])
def test_evaluations_of_other_walks_are_refused(change, needle):
    new = {**evaluation(next_psnr=[1.0, 2.0, 3.0]), **change}
    with pytest.raises(ValueError) as err:
        paired(new, evaluation(next_psnr=[1.0, 2.0, 3.0]))
    assert needle in str(err.value)


def test_a_score_not_in_both_is_refused():
    new = evaluation(next_psnr=[1.0, 2.0], rollout_psnr_64=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"keys: 'rollout_psnr_64' has no per-seed scores in both files; expected some of \['next_psnr'\]"):
        paired(new, evaluation(next_psnr=[1.0, 2.0]), ["rollout_psnr_64"])
    short = {**new, "next_psnr_per_seed": [1.0]}
    with pytest.raises(ValueError, match="next_psnr_per_seed holds 1 scores in new and 2 in old"):
        paired(short, evaluation(next_psnr=[1.0, 2.0]))


def test_files_that_are_not_evaluations_are_refused(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bench.json").write_text(json.dumps({"configs": {}}))
    for name, problem in [("missing.json", "cannot be read"), ("bad.json", "is not JSON"),
                          ("bench.json", "is not an evaluation with per-seed scores")]:
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as err:
            read_evaluation(path, "new")
        assert f"new {path!r} {problem}" in str(err.value)


def test_command_line_prints_the_table_and_reports_bad_input_in_one_line(tmp_path):
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps(evaluation(next_psnr=[41.0, 42.0, 44.0])))
    old.write_text(json.dumps(evaluation(next_psnr=[40.0, 42.0, 41.0])))
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "runtime.compare", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    proc = run(f"new={new}", f"old={old}")
    assert proc.returncode == 0, proc.stderr
    assert "| next_psnr | 42.33 | 41.00 | +1.33 (0.88; 2 of 3) |" in proc.stdout
    proc = run(f"new={new}")
    assert proc.returncode == 2 and "runtime.compare: error: old is not set" in proc.stderr
    proc = run(f"new={new}", f"old={old}", "keys=[rollout_psnr_16]")
    assert proc.returncode == 2 and "runtime.compare: error: keys: 'rollout_psnr_16' has no per-seed" in proc.stderr
    assert "Traceback" not in proc.stderr
