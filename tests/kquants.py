"""GGUF K-quant blocks (Q4_K, Q5_K, Q6_K) for test files: gguf-py dequantizes these types but
cannot quantize them, so this is a numpy port of ggml's reference quantizers
(``quantize_row_q{4,5,6}_K_ref`` with ``make_qkx2_quants`` / ``make_qx_quants``, ggml-quants.c of
ggml-org/llama.cpp), vectorised over blocks. Float sums run in a different order than in C, so a
block may differ from llama-quantize's in a last rounding; every block is valid and gguf-py's
``dequantize`` is the oracle the tests compare against.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
SEARCH = True  # False: scales from min / max only (nstep 0), several times faster, for speed-only files


def _rint(x):
    return np.rint(x).astype(np.int32)  # ggml's nearest_int rounds half to even


def _qkx2(x, nmax, rmin, rdelta, nstep):
    """make_qkx2_quants on sub-blocks x [..., 32]: (scale, -min, codes)."""
    sum_x2 = (x * x).sum(-1, keepdims=True)
    w = np.sqrt(sum_x2 / x.shape[-1]) + np.abs(x)
    lo = np.minimum(x.min(-1, keepdims=True), 0)
    hi = x.max(-1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1)
    flat = hi == lo
    iscale = nmax / span
    codes = np.clip(_rint(iscale * (x - lo)), 0, nmax)
    scale, mn = 1 / iscale, lo
    best = (w * (scale * codes + mn - x) ** 2).sum(-1, keepdims=True)
    sum_w, sum_x = w.sum(-1, keepdims=True), (w * x).sum(-1, keepdims=True)
    for step in range(nstep + 1 if SEARCH else 0):
        l = np.clip(_rint((rmin + rdelta * step + nmax) / span * (x - lo)), 0, nmax).astype(np.float32)
        sl, sl2, sxl = (w * l).sum(-1, keepdims=True), (w * l * l).sum(-1, keepdims=True), (w * l * x).sum(-1, keepdims=True)
        d = sum_w * sl2 - sl * sl
        ok = d > 0
        dd = np.where(ok, d, 1)
        s_new, m_new = (sum_w * sxl - sum_x * sl) / dd, (sl2 * sum_x - sl * sxl) / dd
        pos = m_new > 0
        s_new = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1), s_new)
        m_new = np.where(pos, 0, m_new)
        err = (w * (s_new * l + m_new - x) ** 2).sum(-1, keepdims=True)
        take = ok & (err < best)
        codes = np.where(take, l.astype(np.int32), codes)
        best, scale, mn = np.where(take, err, best), np.where(take, s_new, scale), np.where(take, m_new, mn)
    scale, mn = np.where(flat, 0, scale), np.where(flat, lo, mn)
    return scale[..., 0], -mn[..., 0]


def _pack_scales(ls, lm):
    """Eight six-bit scales and mins -> ggml's 12 bytes (get_scale_min_k4's inverse)."""
    out = np.zeros((*ls.shape[:-1], 12), np.uint8)
    out[..., 0:4] = ls[..., 0:4] | ((ls[..., 4:8] >> 4) << 6)
    out[..., 4:8] = lm[..., 0:4] | ((lm[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (ls[..., 4:8] & 0xF) | ((lm[..., 4:8] & 0xF) << 4)
    return out


def _k_scales(x, nmax, rmin, nstep):
    """Q4_K / Q5_K: per-block d, dmin (fp16), packed scales and the codes [..., 256]."""
    sub = x.reshape(*x.shape[:-1], 8, 32)
    scales, mins = _qkx2(sub, nmax, rmin, 0.1, nstep)
    max_s, max_m = scales.max(-1, keepdims=True), mins.max(-1, keepdims=True)
    inv_s = np.where(max_s > 0, 63 / np.where(max_s > 0, max_s, 1), 0)
    inv_m = np.where(max_m > 0, 63 / np.where(max_m > 0, max_m, 1), 0)
    ls = np.minimum(63, _rint(inv_s * scales)).astype(np.uint8)
    lm = np.minimum(63, _rint(inv_m * mins)).astype(np.uint8)
    d, dmin = (max_s / 63).astype(np.float16), (max_m / 63).astype(np.float16)
    dd = d.astype(np.float32) * ls
    dm = dmin.astype(np.float32) * lm
    q = np.where(dd[..., None] != 0, _rint((sub + dm[..., None]) / np.where(dd != 0, dd, 1)[..., None]), 0)
    return d, dmin, _pack_scales(ls, lm), np.clip(q, 0, nmax).reshape(x.shape)


def _halves(codes, chunk):
    """Runs of 2*chunk codes -> chunk bytes, low nibble from the first half, high from the second."""
    c = codes.reshape(*codes.shape[:-1], -1, 2, chunk)
    return ((c[..., 0, :] & 0xF) | ((c[..., 1, :] & 0xF) << 4)).reshape(*codes.shape[:-1], -1).astype(np.uint8)


def quantize(x: np.ndarray, kind: str) -> np.ndarray:
    """float rows [..., K] (K a multiple of 256) -> GGUF bytes [..., K / 256 * block bytes]."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], -1, QK_K)
    if kind == "Q4_K":
        d, dmin, sc, q = _k_scales(blocks, 15, -1.0, 20)
        parts = [d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), sc, _halves(q, 32)]
    elif kind == "Q5_K":
        d, dmin, sc, q = _k_scales(blocks, 31, -0.5, 15)
        high = (q >> 4).reshape(*q.shape[:-1], 8, 32)  # bit b of byte j: element 32 b + j
        qh = (high << np.arange(8, dtype=np.int32)[:, None]).sum(-2).astype(np.uint8)
        parts = [d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), sc, qh, _halves(q & 0xF, 32)]
    elif kind == "Q6_K":
        parts = _q6_k(blocks)
    else:
        raise ValueError(kind)
    return np.concatenate([p.reshape(*blocks.shape[:-1], -1) for p in parts], -1).reshape(*x.shape[:-1], -1)


def _qx(x, nmax):
    """make_qx_quants with rmse_type 1 on sub-blocks x [..., 16]: the scale."""
    amax_i = np.abs(x).argmax(-1)[..., None]
    mx = np.take_along_axis(x, amax_i, -1)
    live = np.abs(mx) >= 1e-15
    mx = np.where(live, mx, 1)
    w = x * x

    def fit(iscale):
        l = np.clip(_rint(iscale * x), -nmax, nmax - 1).astype(np.float32)
        return (w * x * l).sum(-1, keepdims=True), (w * l * l).sum(-1, keepdims=True)

    sumlx, suml2 = fit(-nmax / mx)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0)
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s and SEARCH]:
        sx, s2 = fit(-(nmax + 0.1 * step) / mx)
        take = (s2 > 0) & (sx * sx > best * s2)
        scale = np.where(take, sx / np.where(s2 > 0, s2, 1), scale)
        best = np.where(take, scale * sx, best)
    return np.where(live, scale, 0)[..., 0]


def _q6_k(blocks):
    sub = blocks.reshape(*blocks.shape[:-1], 16, 16)
    scales = _qx(sub, 32)
    pick = np.abs(scales).argmax(-1)[..., None]
    max_scale = np.take_along_axis(scales, pick, -1)
    live = np.abs(max_scale) >= 1e-15
    iscale = np.where(live, -128 / np.where(live, max_scale, 1), 0)
    d = np.where(live, 1 / np.where(live, iscale, 1), 0).astype(np.float16)
    sc = np.where(live, np.minimum(127, _rint(iscale * scales)), 0).astype(np.int8)
    dd = d.astype(np.float32) * sc
    q = np.where(dd[..., None] != 0, _rint(sub / np.where(dd != 0, dd, 1)[..., None]), 0)
    L = (np.clip(q, -32, 31) + 32).reshape(*blocks.shape[:-1], 2, 4, 32)  # per 128: four runs of 32
    ql = np.concatenate([L[..., 0, :] & 0xF | ((L[..., 2, :] & 0xF) << 4),
                         L[..., 1, :] & 0xF | ((L[..., 3, :] & 0xF) << 4)], -1)
    qh = (L[..., 0, :] >> 4) | ((L[..., 1, :] >> 4) << 2) | ((L[..., 2, :] >> 4) << 4) | ((L[..., 3, :] >> 4) << 6)
    return [ql.reshape(*blocks.shape[:-1], -1).astype(np.uint8), qh.reshape(*blocks.shape[:-1], -1).astype(np.uint8),
            sc.view(np.uint8), d.view(np.uint8)]
