"""Where AnnSA and AnnCA pay: `python -m runtime.sparse_bench [--threads 2] [--heads 4] [--blocks 16 64 256 1024] [--anns quant lsh exact pooled] [--prompt-tokens 256 1024 4096]`.

Times one self-attention call of a 64-token query block over a filled dense cache, dense
(`CachedSelfAttention`) against AnnSA (`AnnSelfAttention`, selection included) for each
ANN backend of `--anns` (default quant, lsh and exact; add `pooled` for AnnSA's mean-pooled block scores), at 25% density, in bf16 on the CPU (or `--device cuda`). Then one
cross-attention call of a two-frame pass (2 x 64 queries) over prompts of each size,
dense against AnnCA (`AnnCrossAttention`, selection included). Prints tables of
milliseconds per call. Attention-only figures: not end to end.
"""
from __future__ import annotations

import argparse

import torch

from runtime.ann import time_calls
from runtime.attention import CachedSelfAttention, sdpa
from runtime.cache import CacheSpec, DenseCache
from runtime.sparse import AnnCrossAttention, AnnSelfAttention, AttentionConfig, AttentionRuntime


def time_ms(fn, device: torch.device, repeats: int) -> float:
    return time_calls(fn, device, repeats, warmup=3)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--anns", nargs="+", default=["quant", "lsh", "exact"])
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dt = torch.device(args.device), torch.bfloat16
    h, d, n = args.heads, args.head_dim, args.block
    print(f"device {device}, bf16, {h} heads x {d}, query block {n}, density {args.density}")
    print("cached blocks | dense ms | " + " | ".join(f"AnnSA {a} ms" for a in args.anns))
    with torch.no_grad():
        for nkb in args.blocks:
            cache = DenseCache(CacheSpec(1, 1, h, d, n, device, dt), initial_frames=nkb + 2)
            for _ in range(nkb):
                cache.stage(0, torch.randn(1, h, n, d, dtype=dt, device=device), torch.randn(1, h, n, d, dtype=dt, device=device))
                cache.commit(0)
            q, k, v = (torch.randn(1, h, n, d, dtype=dt, device=device) for _ in range(3))
            dense = time_ms(lambda: CachedSelfAttention(cache, 0)(0, q, k, v, k), device, args.repeats)
            row = [f"{nkb}", f"{dense:.2f}"]
            for ann in args.anns:  # "pooled": mean-pooled block scores instead of an ANN backend's
                select = {"select": "pooled", "ann": "exact"} if ann == "pooled" else {"select": "ann", "ann": ann}
                rt = AttentionRuntime(AttentionConfig(annsa=True, block=n, density=args.density, min_blocks=1, **select))
                rt.cache = cache
                row.append(f"{time_ms(lambda: AnnSelfAttention(rt, cache, 0, True)(0, q, k, v, k), device, args.repeats):.2f}")
            print(" | ".join(row), flush=True)
        print("prompt tokens | dense cross-attention ms | "
              + " | ".join(f"AnnCA {a} ms" for a in args.anns if a != "pooled"))
        for t in args.prompt_tokens:
            q = torch.randn(1, h, 2 * n, d, dtype=dt, device=device)
            pk, pv = (torch.randn(1, h, t, d, dtype=dt, device=device) for _ in range(2))
            row = [f"{t}", f"{time_ms(lambda: sdpa(q, pk, pv, None), device, args.repeats):.2f}"]
            for ann in [a for a in args.anns if a != "pooled"]:  # AnnCA selects tokens through an ANN backend
                rt = AttentionRuntime(AttentionConfig(annca=True, ann=ann, ann_options={} if ann == "lsh" else {"mask_k": 64}))
                ca = AnnCrossAttention(rt, n)
                row.append(f"{time_ms(lambda: ca(0, q, pk, pv), device, args.repeats):.2f}")
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
