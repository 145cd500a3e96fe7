"""Paired differences of two evaluations: `python -m runtime.compare new=A.json old=B.json`.

Two checkpoints evaluated on the same walks differ less from each other than either does
between walks: a walk into new ground is hard for both. For each score both files hold per
seed (`*_per_seed`, from `runtime.evaluate`), prints the two means, the mean of the
per-walk differences new - old, its standard error (sample standard deviation / sqrt(n))
and on how many walks new scored higher. The walks must be the same: the same world, seeds
and number of sequences, and the same repeat-last baselines (`copy_last_psnr_*`, which
depend on the walks alone: evaluations with other horizons walk elsewhere).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from runtime.cli import cli_errors
from runtime.configs import check_config_files, check_type

SUFFIX = "_per_seed"


def read_evaluation(path: str, key: str) -> dict:
    """An evaluation's JSON: ValueError naming `key` and the file if it is not one."""
    try:
        result = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"{key} {path!r} cannot be read: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{key} {path!r} is not JSON: {err}") from None
    if not isinstance(result, dict) or not any(k.endswith(SUFFIX) for k in result):
        raise ValueError(f"{key} {path!r} is not an evaluation with per-seed scores (no '*{SUFFIX}' key; "
                         "expected the out=FILE.json of python -m runtime.evaluate)")
    return result


def same_walks(new: dict, old: dict) -> None:
    """ValueError unless both evaluations walked the same walks."""
    for key in ("world", "seeds", "sequences"):
        if new.get(key) != old.get(key):
            raise ValueError(f"the evaluations differ in {key}: new {new.get(key)!r}, old {old.get(key)!r}; "
                             "expected the same walks")
    for key in sorted(k for k in new if k.startswith("copy_last_psnr_") and k in old):
        if new[key] != old[key]:
            raise ValueError(f"the evaluations' repeat-last baselines differ ({key}: new {new[key]!r}, old "
                             f"{old[key]!r}), so their walks do: expected evaluations with the same eval settings")


def paired(new: dict, old: dict, keys: list[str] | None = None) -> list[dict]:
    """One row per score: its means in both, the paired difference's mean and standard
    error (None for one walk) and the walks on which new scored higher."""
    same_walks(new, old)
    shared = [k[:-len(SUFFIX)] for k in new if k.endswith(SUFFIX) and k in old]
    if keys is None:
        keys = shared
    rows = []
    for key in keys:
        if key not in shared:
            raise ValueError(f"keys: {key!r} has no per-seed scores in both files; expected some of {shared}")
        a, b = new[key + SUFFIX], old[key + SUFFIX]
        if len(a) != len(b) or not a:
            raise ValueError(f"{key}{SUFFIX} holds {len(a)} scores in new and {len(b)} in old; expected the same number")
        d = [x - y for x, y in zip(a, b)]
        n, mean = len(d), sum(d) / len(d)
        sem = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else None
        rows.append({"key": key, "new": sum(a) / n, "old": sum(b) / n, "difference": mean, "sem": sem,
                     "higher": sum(x > 0 for x in d), "walks": n})
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| score | new | old | paired difference (standard error; walks new scored higher) |",
             "|---|---|---|---|"]
    for r in rows:
        sem = "n/a" if r["sem"] is None else f"{r['sem']:.2f}"
        lines.append(f"| {r['key']} | {r['new']:.2f} | {r['old']:.2f} | {r['difference']:+.2f} ({sem}; "
                     f"{r['higher']} of {r['walks']}) |")
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with cli_errors("runtime.compare"):  # a missing or foreign file, other walks, an unknown key: one line, exit 2
        for key in ("new", "old"):
            if not cfg.get(key):
                raise ValueError(f"{key} is not set; expected the path of an evaluation's JSON ({key}=FILE.json)")
        keys = None if cfg.get("keys") is None else check_type(cfg["keys"], list[str], "keys")
        rows = paired(read_evaluation(str(cfg.new), "new"), read_evaluation(str(cfg.old), "old"), keys)
    print(table(rows))


if __name__ == "__main__":
    check_config_files("runtime.compare", sys.argv[1:])
    main()
