"""The world model: a block-causal diffusion transformer over patch tokens of frames.

Each frame is cut into P x P patches (64 tokens for a 64x64 frame with patch 8). A token
carries its patch of the (noisy) frame being generated *and* the same patch of the
previous clean frame (of the K previous clean frames with `prev_frames` = K, the last one
first); the network predicts a residual, and the clean-frame estimate is
x0 = previous frame + residual. With `motion_radius` = r > 0 it also predicts, for every
pixel, a weight on each of a few displaced copies of the previous frame (up to r pixels
along one axis and 1 along the other: a scroll plus a one-pixel step), and
x0 = previous + residual + sum_s weight_s * (previous displaced by s - previous): moving
something by a pixel is then a choice among copies rather than a drawing. Every block is

    x += gate1 * SelfAttn(modulate(norm(x)))      # over [cached past frames + this chunk]
    x += CrossAttn(norm(x), prompt)               # the world's tile set
    x += gate2 * MLP(modulate(norm(x)))

with adaptive-norm modulation from (diffusion time + action) per frame, qk-RMSNorm, and
3-D rotary positions (frame, row, column) applied to queries and keys.

The model does not know about caches policies or samplers: self-attention goes through
a `SelfAttentionContext` handed in by the caller (see `runtime/attention.py`), which
decides which past keys the chunk sees.

Shape legend: B batch, F frames, N tokens per frame, L tokens (F*N), H heads,
D head dim, W width, T prompt tokens, E prompt token features.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.configs import strict_dataclass


@dataclass
class ModelConfig:
    frame_size: int = 64
    channels: int = 3
    patch: int = 8
    width: int = 256
    depth: int = 8
    heads: int = 4
    mlp_ratio: float = 4.0
    num_actions: int = 6
    prompt_tokens: int = 256
    prompt_dim: int = 12
    rope_frame_dims: int = 16   # of each head's dims, rotated by the frame index
    rope_base: float = 100.0
    prev_frames: int = 1        # previous clean frames each token carries (the last one first)
    motion_radius: int = 0      # > 0: per-pixel weights on displaced copies of the previous frame

    def __post_init__(self) -> None:
        if not isinstance(self.prev_frames, int) or isinstance(self.prev_frames, bool) or self.prev_frames < 1:
            raise ValueError(f"model.prev_frames={self.prev_frames!r}; expected an integer >= 1")
        r = self.motion_radius
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < self.frame_size // 2:
            raise ValueError(f"model.motion_radius={r!r}; expected an integer in [0, {self.frame_size // 2 - 1}]")
        if self.frame_size % self.patch:
            raise ValueError(f"model.frame_size={self.frame_size} is not a multiple of model.patch={self.patch}")
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} is not divisible by model.heads={self.heads}")
        hd = self.width // self.heads
        spatial = hd - self.rope_frame_dims
        if self.rope_frame_dims % 2 or spatial % 4 or spatial <= 0:
            raise ValueError(
                f"model.rope_frame_dims={self.rope_frame_dims} must be even and leave a multiple of 4 "
                f"of the head dim {hd} for rows and columns"
            )

    @property
    def grid(self) -> int:
        return self.frame_size // self.patch

    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch * self.patch

    @property
    def motion_offsets(self) -> list[tuple[int, int]]:
        """The displacements (dy, dx) the motion weights choose among: up to
        `motion_radius` pixels along one axis and at most 1 along the other, (0, 0) left
        out (the residual's base). 32 for radius 3."""
        r = self.motion_radius
        span = range(-r, r + 1)
        return [(dy, dx) for dy in span for dx in span if (dy, dx) != (0, 0) and min(abs(dy), abs(dx)) <= 1]

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return strict_dataclass(cls, d, "model")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- helpers


def patchify(frames: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, F, C, S, S) -> (B, F, N, C*P*P), patches in row-major order."""
    b, f, c, s, _ = frames.shape
    g = s // patch
    x = frames.reshape(b, f, c, g, patch, g, patch)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, f, g * g, c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(B, F, N, C*P*P) -> (B, F, C, S, S)."""
    b, f, n, _ = tokens.shape
    g = int(math.isqrt(n))
    x = tokens.reshape(b, f, g, g, channels, patch, patch)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, f, channels, g * patch, g * patch)


def rope_angles(cfg: ModelConfig, frame_index: torch.Tensor) -> torch.Tensor:
    """Rotation angles for every token of the given frames.

    frame_index: (F,) float or int frame numbers. Returns (F*N, D/2) float32 angles:
    the first rope_frame_dims/2 pairs turn with the frame index, the rest split evenly
    between row and column.
    """
    hd = cfg.head_dim
    nf = cfg.rope_frame_dims // 2
    ns = (hd // 2 - nf) // 2
    dev = frame_index.device

    def freqs(n: int) -> torch.Tensor:
        return cfg.rope_base ** (-torch.arange(n, device=dev, dtype=torch.float32) / max(n, 1))

    g = cfg.grid
    rows = torch.arange(g, device=dev, dtype=torch.float32).repeat_interleave(g)  # (N,)
    cols = torch.arange(g, device=dev, dtype=torch.float32).repeat(g)  # (N,)
    fi = frame_index.to(torch.float32)
    a_f = fi[:, None, None] * freqs(nf)[None, None, :]  # (F, 1, nf)
    a_f = a_f.expand(-1, g * g, -1)
    a_r = (rows[:, None] * freqs(ns)[None, :])[None].expand(fi.shape[0], -1, -1)
    a_c = (cols[:, None] * freqs(ns)[None, :])[None].expand(fi.shape[0], -1, -1)
    return torch.cat([a_f, a_r, a_c], dim=-1).reshape(-1, hd // 2)  # (F*N, D/2)


def rope_tables(ang: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, D/2) angles -> cos, sin (L, D) float32, each value repeated for its pair of
    dimensions; made once per forward pass for every layer."""
    return torch.cos(ang).repeat_interleave(2, -1), torch.sin(ang).repeat_interleave(2, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, D); cos, sin: (L, D) from rope_tables. Rotates interleaved pairs
    (x0, x1) to (x0 c - x1 s, x0 s + x1 c), written as x * cos + (-x1, x0) * sin: per
    element the same rounded products and sums as the pairwise form, in fewer kernels."""
    rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of diffusion times t in [0, 1]: (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.to(torch.float32) * 1000.0)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# ----------------------------------------------------------------------------- blocks


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w, h = cfg.width, cfg.heads
        self.heads = h
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(w, 3 * w)
        self.q_norm = RMSNorm(cfg.head_dim)
        self.k_norm = RMSNorm(cfg.head_dim)
        self.proj = nn.Linear(w, w)
        self.norm_x = nn.LayerNorm(w, eps=1e-6)
        self.xq = nn.Linear(w, w)
        self.xkv = nn.Linear(w, 2 * w)
        self.xq_norm = RMSNorm(cfg.head_dim)
        self.xk_norm = RMSNorm(cfg.head_dim)
        self.xproj = nn.Linear(w, w)
        self.norm2 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        hidden = round(w * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(w, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, w))
        self.ada = nn.Linear(w, 6 * w)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        nn.init.zeros_(self.xproj.weight)
        nn.init.zeros_(self.xproj.bias)

    def split_heads(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """(B, L, W) -> (B, H, L, D); the optional per-head norm runs on the contiguous view."""
        b, l, w = x.shape
        x = x.view(b, l, self.heads, w // self.heads)
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)

    def prompt_kv(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt: (B, T, W) embedded prompt -> keys, values (B, H, T, D)."""
        k, v = self.xkv(prompt).chunk(2, dim=-1)
        return self.split_heads(k, self.xk_norm), self.split_heads(v)

    def forward(self, x, cond, cos, sin, self_attn, layer: int, cross_attn, prompt_k, prompt_v, fns=None):
        """x: (B, L, W) with L = F*N; cond: (B, F, W) per-frame conditioning (time + action).
        The dense parts run through `fns` (compiled versions of the three functions below,
        `WorldModel.compile_blocks`); the attention calls always run as they are."""
        enter, middle, leave = fns or (block_enter, block_middle, block_leave)
        x, q, k, v, k_pre, g1, sh2, sc2, g2 = enter(self, x, cond, cos, sin)
        a = self_attn(layer, q, k, v, k_pre)  # (B, H, L, D)
        x, xq = middle(self, x, a, g1)
        xa = cross_attn(layer, xq, prompt_k, prompt_v)
        return leave(self, x, xa, sh2, sc2, g2)


def block_enter(blk: Block, x, cond, cos, sin):
    """Modulation, the self-attention's queries, keys (with and without RoPE) and values."""
    b, l, w = x.shape
    f = cond.shape[1]
    # modulation is per frame: compute it once per frame, broadcast over its N tokens
    mod = blk.ada(cond)[:, :, None, :]  # (B, F, 1, 6W)
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
    x = x.view(b, f, l // f, w)
    hx = blk.norm1(x) * (1 + sc1) + sh1
    q, k, v = blk.qkv(hx).view(b, l, 3 * w).chunk(3, dim=-1)
    q = blk.split_heads(q, blk.q_norm)
    k = blk.split_heads(k, blk.k_norm)
    v = blk.split_heads(v)
    k_pre = k  # pre-RoPE keys: what TempCache may match content on
    return x, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, k_pre, g1, sh2, sc2, g2


def block_middle(blk: Block, x, a, g1):
    """The self-attention's output projection and residual; the cross-attention's queries."""
    b, f, n, w = x.shape
    x = x + g1 * blk.proj(a.transpose(1, 2).reshape(b, f, n, w))
    xq = blk.split_heads(blk.xq(blk.norm_x(x)).view(b, f * n, w), blk.xq_norm)
    return x, xq


def block_leave(blk: Block, x, xa, sh2, sc2, g2):
    """The cross-attention's output projection and residual, then the modulated MLP."""
    b, f, n, w = x.shape
    x = x + blk.xproj(xa.transpose(1, 2).reshape(b, f, n, w))
    hx = blk.norm2(x) * (1 + sc2) + sh2
    return (x + g2 * blk.mlp(hx)).view(b, f * n, w)


_COMPILED_BLOCK_FNS = None


def compiled_block_fns():
    """torch.compile of the three dense parts of a block (static shapes), made once per
    process and shared by every block: the parameters are inputs of the compiled graphs."""
    global _COMPILED_BLOCK_FNS
    if _COMPILED_BLOCK_FNS is None:
        _COMPILED_BLOCK_FNS = tuple(torch.compile(fn, dynamic=False) for fn in (block_enter, block_middle, block_leave))
    return _COMPILED_BLOCK_FNS


def motion_mix(prev: torch.Tensor, weights: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """sum_s weights[:, :, s] * (prev displaced by offsets[s] - prev), where prev displaced
    by (dy, dx) holds at pixel (y, x) the pixel (y + dy, x + dx) of prev (the nearest edge
    pixel beyond the border). prev: (B, F, C, S, S); weights: (B, F, len(offsets), S, S)."""
    b, f, c, s, _ = prev.shape
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(prev.reshape(b * f, c, s, s), (r, r, r, r), mode="replicate").view(b, f, c, s + 2 * r, s + 2 * r)
    out = -weights.sum(2, keepdim=True) * prev
    for i, (dy, dx) in enumerate(offsets):
        out = out + weights[:, :, i : i + 1] * padded[..., r + dy : r + dy + s, r + dx : r + dx + s]
    return out


def push_frame(prev: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """The previous-frames stack (B, F, K*C, S, S) after `frame` (B, F, C, S, S): the frame
    first, the oldest one dropped. With K = 1 that is the frame itself."""
    c = frame.shape[2]
    return frame if prev.shape[2] == c else torch.cat([frame, prev[:, :, :-c]], dim=2)


def widen_prev_frames(state: dict[str, torch.Tensor], cfg: "ModelConfig") -> dict[str, torch.Tensor]:
    """Weights of a model with fewer `prev_frames` made into weights of `cfg`: the input
    projection gets zero columns for the added frames, so the widened model computes
    exactly what the original did until training teaches it to use them."""
    w = state["embed.weight"]  # (width, (1 + k) * patch_dim)
    want = (1 + cfg.prev_frames) * cfg.patch_dim
    if w.shape[1] > want or w.shape[1] % cfg.patch_dim:
        raise ValueError(f"embed.weight of shape {tuple(w.shape)} cannot be widened to {want} inputs")
    return {**state, "embed.weight": torch.cat([w, w.new_zeros(w.shape[0], want - w.shape[1])], dim=1)}


def take_blocks(state: dict[str, torch.Tensor], blocks: list[int], depth: int) -> dict[str, torch.Tensor]:
    """Weights of a model of `depth` blocks made into weights of a model with the blocks
    `blocks` of it, in that order (a shallower model started from a deeper one's blocks);
    every weight outside the blocks is kept as it is."""
    if (not blocks or len(set(blocks)) != len(blocks)
            or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < depth for i in blocks)):
        raise ValueError(f"blocks {blocks!r}: expected distinct block indices in [0, {depth}), at least one")
    out = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    for j, i in enumerate(blocks):
        prefix = f"blocks.{i}."
        out.update({f"blocks.{j}." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return out


def add_motion_head(state: dict[str, torch.Tensor], cfg: "ModelConfig") -> dict[str, torch.Tensor]:
    """Weights of a model without motion weights made into weights of `cfg` (motion_radius
    > 0): the motion head starts at zero, so the model computes exactly what it did."""
    if any(k.startswith("motion.") for k in state):
        raise ValueError("these weights already have a motion head; it cannot be re-sized")
    w = state["out.weight"]
    n = len(cfg.motion_offsets) * cfg.patch * cfg.patch
    return {**state, "motion.weight": w.new_zeros(n, w.shape[1]), "motion.bias": w.new_zeros(n)}


class WorldModel(nn.Module):
    """Predicts clean frames from noisy ones, given the previous frames, action and time."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.embed = nn.Linear((1 + cfg.prev_frames) * cfg.patch_dim, w)
        self.t_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.a_embed = nn.Embedding(cfg.num_actions, w)
        self.prompt_embed = nn.Linear(cfg.prompt_dim, w)
        self.prompt_pos = nn.Parameter(torch.randn(cfg.prompt_tokens, w) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(w, 2 * w)
        self.out = nn.Linear(w, cfg.patch_dim)
        heads = [self.ada_out, self.out]
        if cfg.motion_radius:
            self.motion = nn.Linear(w, len(cfg.motion_offsets) * cfg.patch * cfg.patch)
            heads.append(self.motion)
        for head in heads:  # the model starts as "repeat the previous frame"
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.compiled = False

    def compile_blocks(self, on: bool = True) -> "WorldModel":
        """Run the blocks' dense parts (modulation, projections, norms, RoPE, MLP) through
        torch.compile, which fuses their elementwise work; the attention calls (caches,
        sparse kernels) stay eager. Each new input shape compiles once (`engine.compile`)."""
        self.compiled = bool(on)
        return self

    # --- prompt: computed once per world, reused by every step
    def encode_prompt(self, prompt: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """prompt: (B, T, E) -> per layer (keys, values), each (B, H, T, D)."""
        if prompt.shape[-2:] != (self.cfg.prompt_tokens, self.cfg.prompt_dim):
            raise ValueError(
                f"prompt shape {tuple(prompt.shape)} does not match the model's "
                f"({self.cfg.prompt_tokens}, {self.cfg.prompt_dim})"
            )
        p = self.prompt_embed(prompt) + self.prompt_pos  # (B, T, W)
        return [blk.prompt_kv(p) for blk in self.blocks]

    def forward(
        self,
        noisy: torch.Tensor,       # (B, F, C, S, S) frames being denoised (or clean ones)
        prev: torch.Tensor,        # (B, F, K*C, S, S) each frame's K previous clean frames, the last one first
        t: torch.Tensor,           # (B, F) diffusion time of each frame (0 = clean)
        actions: torch.Tensor,     # (B, F) int action that produced each frame
        frame_index: torch.Tensor, # (F,) absolute frame numbers (RoPE)
        self_attn,                 # callable(layer, q, k, v, k_pre) -> (B, H, L, D)
        cross_attn,                # callable(layer, q, k, v) -> (B, H, L, D)
        prompt_kv,                 # per-layer prompt (keys, values), or the raw prompt (B, T, E)
        outputs: int | None = None,  # estimate only the last this many frames (all: None)
    ) -> torch.Tensor:
        """Returns the clean-frame estimate x0, (B, F, C, S, S), or (B, outputs, C, S, S)
        for the last `outputs` frames (the others are context: only their keys and values
        matter)."""
        cfg = self.cfg
        if isinstance(prompt_kv, torch.Tensor):
            prompt_kv = self.encode_prompt(prompt_kv)
        b, f = noisy.shape[:2]
        n = cfg.tokens_per_frame
        xp = patchify(noisy, cfg.patch)
        pp = patchify(prev, cfg.patch)
        x = self.embed(torch.cat([xp, pp], dim=-1)).reshape(b, f * n, -1)  # (B, L, W)
        c = self.t_embed(timestep_embedding(t, cfg.width).to(x.dtype)) + self.a_embed(actions)  # (B, F, W)
        cond = F.silu(c)  # (B, F, W)
        # in the residual stream's dtype once per pass (apply_rope's casts are then no-ops for
        # a model in bf16; under autocast the stream is float32 and each call casts as before)
        cos, sin = (t.to(x.dtype) for t in rope_tables(rope_angles(cfg, frame_index)))
        fns = compiled_block_fns() if self.compiled else None
        for i, blk in enumerate(self.blocks):
            pk, pv = prompt_kv[i]
            x = blk(x, cond, cos, sin, self_attn, i, cross_attn, pk, pv, fns)
        o = f if outputs is None else int(outputs)
        if not 0 < o <= f:
            raise ValueError(f"outputs={outputs!r}; expected 1..{f} (the frames in the pass) or None")
        x, cond, prev = x.view(b, f, n, -1)[:, f - o :], cond[:, f - o :], prev[:, f - o :, : cfg.channels]
        sh, sc = self.ada_out(cond)[:, :, None, :].chunk(2, dim=-1)  # (B, O, 1, W)
        x = self.norm_out(x) * (1 + sc) + sh
        res = self.out(x)  # (B, O, N, C*P*P)
        if not cfg.motion_radius:
            return prev + unpatchify(res, cfg.patch, cfg.channels)
        # the mix's 33 terms cancel on still pixels: summed in float32 (as training does under
        # autocast, where prev is float32) and rounded once to the model's dtype
        offsets = cfg.motion_offsets
        weights = unpatchify(self.motion(x), cfg.patch, len(offsets)).float()
        prev32 = prev.float()
        x0 = prev32 + unpatchify(res, cfg.patch, cfg.channels).float() + motion_mix(prev32, weights, offsets)
        return x0.to(prev.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
