"""Cost of a new key length for GPU attention: `python -m runtime.plan_bench [--out FILE.json]`.

PyTorch's cuDNN attention builds an execution plan for every new input shape. A KV cache
whose length changes every frame (dense, or any cache while it fills) meets a new shape on
every frame. This measures, for the shipped model's and the Wan-shaped model's attention
shapes, one SDPA call at a fixed length (plan built) with the default backend order,
cuDNN alone and flash alone, and the mean time of a call at a length not seen before,
with and without cuDNN allowed (what `runtime.attention.sdpa` chooses between). CUDA only.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from runtime.attention import NO_CUDNN

SHAPES = {  # name: (heads, head_dim, queries, keys); queries = the merged pass's two frames
    "overworld_small": (4, 64, 128, 4224),
    "wan_shaped": (12, 128, 3200, 36800),
}


def fixed_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def new_length_ms(q, kb, vb, lengths, backends) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for n in lengths:
        if backends is None:
            F.scaled_dot_product_attention(q, kb[:, :, :n], vb[:, :, :n])
        else:
            with sdpa_kernel(backends):
                F.scaled_dot_product_attention(q, kb[:, :, :n], vb[:, :, :n])
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(lengths) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--calls", type=int, default=20, help="new lengths per measurement")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("plan_bench needs CUDA")
    dev, dt = "cuda", torch.bfloat16
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16", "shapes": {}}
    for name, (h, d, nq, nk) in SHAPES.items():
        q = torch.randn(1, h, nq, d, device=dev, dtype=dt)
        kb = torch.randn(1, h, nk + 64 * 2 * args.calls, d, device=dev, dtype=dt)
        vb = torch.randn_like(kb)
        k, v = kb[:, :, :nk], vb[:, :, :nk]
        row = {"heads": h, "head_dim": d, "queries": nq, "keys": nk,
               "fixed_default_ms": fixed_ms(lambda: F.scaled_dot_product_attention(q, k, v))}
        for label, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel([be]):
                row[f"fixed_{label}_ms"] = fixed_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        # fresh lengths for each measurement (a length measured once has its plan)
        row["new_length_default_ms"] = new_length_ms(q, kb, vb, [nk + 64 * (i + 1) for i in range(args.calls)], None)
        row["new_length_without_cudnn_ms"] = new_length_ms(
            q, kb, vb, [nk + 64 * (args.calls + i + 1) for i in range(args.calls)], NO_CUDNN)
        res["shapes"][name] = {key: round(val, 4) if isinstance(val, float) else val for key, val in row.items()}
        print(name, json.dumps(res["shapes"][name]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
