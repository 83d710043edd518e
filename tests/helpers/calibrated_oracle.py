"""SC-CLIP, SFP and ResCLIP written from their official code, one image at a time, in the
official layout (sequence-first ``[T, 1, W]``, ``bmm`` over ``heads`` rows), for float64 towers.

Independent of armfast's implementation: open_clip's own modules (``ln_1``, ``attn`` with
``need_weights``, ``mlp``) and plain tensor algebra. Only the points the issue settles differ
from the official code: the grid cell of token ``idx`` is ``(idx // w, idx % w)`` with w the
grid's width, the LOF quantile is taken in the scores' own precision, and an SFP outlier without
a usable neighbour keeps its value. The official files: SuleBai/SC-CLIP @ 0417ba9
``clip/model.py``; Kimsure/SFP @ 2804f5b ``SFP_ICCV/clip/model.py``; yvhangyang/ResCLIP @
0e085f7 ``clip/model.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import armfast.clip as aclip


def tower_pass(visual, image):
    """Blocks 0 .. depth-2 on one image ``[1, 3, H, W]``: (block outputs ``[T, 1, W]``, each
    block's per-head attention probabilities ``[1, heads, T, T]``, grid)."""
    x, grid = aclip.embed(visual, image)  # the positional embedding resized to the exact grid
    x = x.transpose(0, 1)  # [T, 1, W], as the official towers run
    outputs, maps = [], []
    for blk in visual.transformer.resblocks[:-1]:
        h = blk.ln_1(x).transpose(0, 1)
        out, w = blk.attn(h, h, h, need_weights=True, average_attn_weights=False)
        x = x + out.transpose(0, 1)
        x = x + blk.mlp(blk.ln_2(x))
        outputs.append(x)
        maps.append(w)
    return outputs, maps, grid


def _split_heads(t, heads):  # [N, 1, W] -> [heads, N, d]
    return t.contiguous().view(t.shape[0], heads, -1).transpose(0, 1)


def _merge_heads(o):  # [heads, N, d] -> [N, 1, W]
    return o.transpose(0, 1).contiguous().view(o.shape[1], 1, -1)


def _qkv(attn, x):
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return tuple(_split_heads(t, attn.num_heads) for t in (q, k, v))


def lof(x, n_neighbors=30, contamination=0.05):
    d = torch.norm(x[:, None] - x[None, :], dim=2, p=2) ** 2
    kd, ki = torch.topk(d, k=n_neighbors + 1, largest=False)
    kd, ki = kd[:, 1:], ki[:, 1:]
    reach = torch.max(kd, kd[:, -1].unsqueeze(1).expand_as(kd))
    lrd = n_neighbors / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    scores = (lrd[ki] / lrd.unsqueeze(1)).mean(dim=1)
    return torch.where(scores > torch.quantile(scores, 1 - contamination))[0]


def mean_interpolation(fmap, cells):
    """fmap ``[1, C, h, w]``; cells: (row, col) pairs. Outliers without a non-outlier
    neighbour keep their value."""
    if len(cells) == 0:
        return fmap
    C = fmap.shape[1]
    dev = fmap.device
    kernel = torch.ones(C, 1, 3, 3, dtype=fmap.dtype, device=dev)
    kernel[:, 0, 1, 1] = 0
    rows = torch.tensor([r for r, _ in cells], device=dev)
    cols = torch.tensor([c for _, c in cells], device=dev)
    mask = torch.ones(fmap.shape[-2:], dtype=fmap.dtype, device=dev)
    mask[rows, cols] = 0
    mask = mask[None, None]
    nsum = F.conv2d(F.pad(fmap * mask, (1, 1, 1, 1)), kernel, groups=C)
    count = F.conv2d(F.pad(mask, (1, 1, 1, 1)), kernel[:, :1], groups=1)
    safe = count.clone()
    safe[safe == 0] = 1
    chosen = torch.zeros_like(mask)
    chosen[:, :, rows, cols] = 1
    update = chosen * (count > 0).to(fmap.dtype)
    return fmap * (1 - update) + (nsum / safe) * update


def _repair(tokens, cells, grid):  # tokens [N, 1, W]
    fmap = tokens.permute(1, 2, 0).reshape(1, tokens.shape[-1], *grid)
    return mean_interpolation(fmap, cells).reshape(1, tokens.shape[-1], -1).permute(2, 0, 1)


def _cells(indices, grid):
    return [(int(i) // grid[1], int(i) % grid[1]) for i in indices]


def _cos(tokens):  # [N, 1, W] -> [1, N, N]
    f = tokens / tokens.norm(dim=2, keepdim=True)
    return torch.matmul(f.permute(1, 0, 2), f.permute(1, 2, 0))


def _aggregate(x, corrs):  # x [N, 1, W]
    w = corrs / (corrs.sum(dim=-1, keepdim=True) + 1e-6)
    return torch.matmul(w, x.permute(1, 0, 2)).permute(1, 0, 2)


def _masked(sim, heads):
    s = (sim - torch.mean(sim)) * 3.0
    s[s < 0.0] = float("-inf")
    return F.softmax(s.repeat(heads, 1, 1), dim=-1)


def _out(attn, weights, v):
    return attn.out_proj(_merge_heads(torch.bmm(weights, v)))


def scclip(visual, feats, maps, grid):
    """Patch tokens ``[N, W]`` before ln_post (SC-CLIP lines 269-306, 318-346)."""
    x = feats[-1]
    cls = x[:1]
    cells = _cells(lof(x[1:].squeeze(1)), grid)
    x = _repair(x[1:], cells, grid)
    ref = _repair(feats[8][1:].clone(), cells, grid)
    before = _cos(ref)
    mid = before.clone()
    before[before < 0.4] = 0.0
    x = _aggregate(x, before)
    blk = visual.transformer.resblocks[-1]

    def attn(t):
        _, k, v = _qkv(blk.attn, blk.ln_1(t))
        scale = k.shape[-1] ** -0.5
        w = _masked(mid, blk.attn.num_heads) + F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, -1)
        return _out(blk.attn, w / 2, v)

    x = attn(x) + 0.3 * cls
    after = _cos(feats[3][1:].clone())
    after[after < 0.4] = 0.0
    x = _aggregate(x, after)
    multi = torch.zeros_like(feats[0])
    for i in range(3, 10):
        multi += feats[i]
    z = _aggregate(attn(multi[1:]) + 0.3 * multi[:1], after)
    return (x + z).squeeze(1)


def sfp_outliers(attn_map, grid):
    """SFP 'SOM' (lines 264, 271-287) on one image's ``[1, heads, T, T]`` block-10 maps."""
    a = attn_map.clone()
    a[:, :, 0, 1:] *= 0.3 * 5.0
    a = a.squeeze(0).mean(dim=0)
    to_patch, own = a[0, 1:], torch.diag(a[1:, 1:])
    salient = to_patch > own
    locs = torch.nonzero(salient, as_tuple=False).squeeze(1)
    order = torch.sort(to_patch[salient], descending=True).indices
    return _cells(locs[order[:10]], grid)


def sfp(visual, feats, maps, grid):
    """Patch tokens ``[N, W]`` before ln_post (SFP lines 242-394)."""
    x = feats[-1]
    cells = sfp_outliers(maps[-1], grid)
    patch = _repair(x[1:], cells, grid)
    state = torch.sum(torch.stack(feats[3:10]), dim=0)
    pre = _cos(_repair(feats[8][1:].clone(), cells, grid))
    pre[pre < 0.4] = 0.0
    patch = _aggregate(patch, pre)
    blk = visual.transformer.resblocks[-1]
    heads = blk.attn.num_heads
    q, k, v = _qkv(blk.attn, blk.ln_1(patch))
    scale = q.shape[-1] ** -0.5
    w = (F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, -1)
         + F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, -1) + _masked(pre, heads)) / 3
    patch = _out(blk.attn, w, v) + 0.3 * x[:1]
    post = _cos(feats[3][1:].clone())
    post[post < 0.4] = 0.0
    patch = _aggregate(patch, post)
    _, _, vs = _qkv(blk.attn, blk.ln_1(state[1:]))
    z = _out(blk.attn, _masked(pre, heads), vs) + 0.3 * state[:1]
    return (patch + _aggregate(z, post)).squeeze(1)


def gaussian_addition(grid, std=5.0, device="cpu"):
    """ResCLIP's ``get_attention_addition`` (lines 398-424): exp(-d^2 / (2 std^2)) between
    patches, 0 on the class token, in float64."""
    h, w = grid
    ii, jj = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                            indexing="ij")
    r, c = ii.flatten().double(), jj.flatten().double()
    d2 = (r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2
    out = torch.zeros(h * w + 1, h * w + 1, dtype=torch.float64, device=device)
    out[1:, 1:] = torch.exp(-d2 / (2 * std ** 2))
    return out[None]


def resclip(visual, feats, maps, grid, tau=2.0, lam=0.3):
    """Patch tokens ``[N, W]`` before ln_post (ResCLIP lines 316-329, 349-360, 451-494 and
    590-600, 'resclip' strategy, 'wo_resi', RCS only)."""
    blk = visual.transformer.resblocks[-1]
    x = feats[-1]
    maps = []
    for i in range(5, 9):  # each earlier block's own q k^T softmax, as ResCLIP recomputes it
        b = visual.transformer.resblocks[i]
        q, k, _ = _qkv(b.attn, b.ln_1(feats[i - 1]))
        maps.append(F.softmax(torch.bmm(q * q.shape[-1] ** -0.5, k.transpose(1, 2)), dim=-1))
    rcs = torch.stack(maps).mean(dim=0)
    _, k, v = _qkv(blk.attn, blk.ln_1(x))
    w = torch.bmm(k, k.transpose(1, 2)) * k.shape[-1] ** -0.5 + gaussian_addition(grid, device=k.device)
    w = tau * ((1 - lam) * F.softmax(w, dim=-1) + lam * rcs)
    return _out(blk.attn, w, v).squeeze(1)[1:]


ORACLES = {"scclip": scclip, "sfp": sfp, "resclip": resclip}


def features(name, visual, state, **kwargs):
    """The baseline's deep features ``[N, E]`` (ln_post, proj) of one image from its
    `tower_pass` ``state``."""
    tokens = ORACLES[name](visual, *state, **kwargs)
    return visual.ln_post(tokens) @ visual.proj


__all__ = ["ORACLES", "features", "tower_pass", "lof", "mean_interpolation", "sfp_outliers",
           "gaussian_addition"]
