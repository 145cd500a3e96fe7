"""Time the AnnSA flex kernel's tile choices at one shape: `python -m runtime.flex_tune
[--density 0.25] [--heads 12] [--head-dim 128] [--frame-tokens 1600] [--budget-frames 21]
[--options JSON ...] [--out FILE.json]` (CUDA).

The call is the one `fastar` makes in the merged pass at the Wan shape: the clean frame and
the noisy frame (2 x frame-tokens queries) over a TempCache buffer of budget-frames frames
plus the two staged frames, `density` of the cached blocks of 128 selected per query block
(at random), the log-count bias as a score_mod. Each `--options` is a JSON object of
flex_attention kernel_options (`{}`: the defaults); every variant is checked against the
first one and timed with CUDA events (`runtime.micro_bench.timed`: median of 20 calls
after 3). Dense SDPA over the same
keys, with and without the bias, is timed for reference. Options that do not fit the GPU
(shared memory) are reported as failures.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.attention import sdpa
from runtime.flex_sparse import FlexBlockSparse
from runtime.micro_bench import timed

DEFAULT_OPTIONS = ['{}', '{"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4}',
                   '{"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}',
                   '{"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}',
                   '{"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}',
                   '{"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}']


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--frame-tokens", type=int, default=1600)
    ap.add_argument("--budget-frames", type=int, default=21)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--options", nargs="+", default=DEFAULT_OPTIONS, help="JSON kernel_options, one per variant")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    variants = []
    for text in args.options:
        try:
            opts = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--options {text!r} is not JSON ({e.msg}); expected an object such as "
                             '\'{"BLOCK_M": 128, "num_warps": 8}\'') from None
        if not isinstance(opts, dict):
            raise SystemExit(f"--options {text!r} is not a JSON object of kernel_options")
        variants.append((text, opts))
    if not torch.cuda.is_available():
        raise SystemExit("flex_tune times the flex kernel on a GPU; no CUDA device here")
    dev, dt = torch.device("cuda"), torch.bfloat16

    def ms(fn) -> float:
        return timed(fn, dev, warmup=3, repeats=20)["ms"]

    g = torch.Generator(device=dev).manual_seed(0)
    h, d, n, blk = args.heads, args.head_dim, args.frame_tokens, args.block
    cap = args.budget_frames * n
    m, buf = 2 * n, cap + 2 * n  # merged pass: clean + noisy frame; buffer: budget + two staged frames
    nkb = cap // blk
    keep = min(nkb, max(1, round(args.density * nkb)))
    nqb = -(-m // blk)
    q = torch.randn(1, h, m, d, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, h, buf, d, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, h, buf, d, device=dev, dtype=dt, generator=g)
    bias = torch.full((1, h, buf), float("-inf"), device=dev, dtype=dt)
    bias[:, :, : cap + m] = torch.rand(1, h, cap + m, device=dev, generator=g).mul(2).to(dt)  # log counts
    sel = torch.rand(1, h, nqb, nkb, device=dev, generator=g).topk(keep, dim=-1).indices
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "density": args.density,
           "kept_blocks": keep, "cached_blocks": nkb, "queries": m, "keys": cap + m, "heads": h, "head_dim": d,
           "sdpa_ms": ms(lambda: F.scaled_dot_product_attention(q, k[:, :, : cap + m], v[:, :, : cap + m])),
           "sdpa_bias_ms": ms(lambda: sdpa(q, k[:, :, : cap + m], v[:, :, : cap + m], bias[:, :, None, : cap + m])),
           "variants": []}
    print(f"{res['device']}: dense SDPA {res['sdpa_ms']:.3f} ms, with the bias {res['sdpa_bias_ms']:.3f} ms; "
          f"flex at {keep}/{nkb} cached blocks:", flush=True)
    ref = None
    for text, opts in variants:
        opts = opts or None
        row = {"options": opts or {}}
        try:
            kern = FlexBlockSparse(blk, blk, kernel_options=opts, max_compiles=64)
            plan = kern.plan(sel, m, n, cap, cap + m, buf)
            out = kern(q, k, v, bias, plan)
            ref = out if ref is None else ref
            row["max_abs_diff"] = float((out.float() - ref.float()).abs().max())
            row["ms"] = ms(lambda: kern(q, k, v, bias, plan))
            print(f"  {row['ms']:7.3f} ms  {text}", flush=True)
        except Exception as e:  # a tile that does not fit this GPU's shared memory, for one
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"  failed   {text}: {row['error']}", flush=True)
        res["variants"].append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
