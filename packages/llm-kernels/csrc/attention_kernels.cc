// Flash attention on the CPU: tiled online softmax (forward) and the two-pass FlashAttention-2
// backward (dq over query blocks; dk, dv over key blocks). Compiled once per ISA (LLMK_ISA).
//
// K, V, Q, dO are first repacked per head into zero-padded row-major and transposed copies, so
// every block product is a plain C += A * B with contiguous rows of B (see simd.h gemm). The
// copies cost O(seq * head_dim) memory, never O(seq^2).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "scratch.h"
#include "simd.h"

namespace llmk {
namespace LLMK_ISA {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Which (query i, key j) pairs are visible; query i sits at absolute position i + offset.
struct Mask {
  const AttnParams& p;
  int64_t offset;
  const int32_t* qs;  // segment ids of this batch row, or nullptr
  const int32_t* ks;

  bool visible(int64_t i, int64_t j) const {
    if (i >= p.q_len || j >= p.kv_len) return false;
    const int64_t pos = i + offset;
    if (p.causal && j > pos) return false;
    if (p.window > 0 && pos - j >= p.window) return false;
    if (qs && qs[i] != ks[j]) return false;
    return true;
  }
  // Every pair of the block is visible: per-element checks can be skipped.
  bool full(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (qs || i1 > p.q_len || j1 > p.kv_len) return false;
    if (p.causal && j1 - 1 > i0 + offset) return false;
    if (p.window > 0 && (i1 - 1 + offset) - j0 >= p.window) return false;
    return true;
  }
  // Key blocks [lo, hi) that may hold visible keys for query rows [i0, i1).
  void key_blocks(int64_t i0, int64_t i1, int64_t bk, int64_t nkb, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = nkb;
    const int64_t phi = std::min(i1, p.q_len) - 1 + offset;
    if (p.causal) hi = std::min(hi, phi < 0 ? 0 : phi / bk + 1);
    if (p.window > 0) lo = std::max<int64_t>(0, floor_div(i0 + offset - p.window + 1, bk));
  }
  // Query blocks [lo, hi) that may see keys [j0, j1).
  void query_blocks(int64_t j0, int64_t j1, int64_t bq, int64_t nqb, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = nqb;
    if (p.causal) lo = std::max<int64_t>(0, floor_div(j0 - offset, bq));
    if (p.window > 0) {
      const int64_t imax = std::min(j1, p.kv_len) - 1 + p.window - 1 - offset;
      hi = std::min(hi, imax < 0 ? 0 : imax / bq + 1);
    }
  }
};

// Copies x[b, :, h, :] ([L, H, D] strided) to rows[Lpad][Dp] and/or to cols, the transpose
// stored as column panels [Lpad / blk][Dp][blk]: a block's panel is contiguous with a short
// leading dimension, avoiding the cache-set conflicts of a power-of-two row stride.
void pack_head(const float* x, int64_t L, int64_t H, int64_t D, int64_t h, int64_t Lpad,
               int64_t Dp, float* rows, float* cols, int64_t blk) {
  if (rows) {
    std::fill(rows, rows + Lpad * Dp, 0.f);
    for (int64_t i = 0; i < L; ++i) std::copy_n(x + (i * H + h) * D, D, rows + i * Dp);
  }
  if (cols) {
    std::fill(cols, cols + Lpad * Dp, 0.f);
    for (int64_t i = 0; i < L; ++i) {
      const float* src = x + (i * H + h) * D;
      float* panel = cols + (i / blk) * Dp * blk + i % blk;
      for (int64_t d = 0; d < D; ++d) panel[d * blk] = src[d];
    }
  }
}

// s <- softcap(s * scale) for n (multiple of W) entries.
inline void scale_and_cap(float* s, int64_t n, float scale, float cap) {
  if (cap > 0.f) {
    const vf inv = splat(1.f / cap), vc = splat(cap);
    for (int64_t c = 0; c < n; c += W) store(s + c, vc * vtanh(load(s + c) * splat(scale) * inv));
  } else {
    for (int64_t c = 0; c < n; c += W) store(s + c, load(s + c) * splat(scale));
  }
}

struct Geometry {
  int64_t Dp, bq, bk, nqb, nkb, lq_pad, lk_pad, group;
  explicit Geometry(const AttnParams& p) {
    Dp = round_up(p.head_dim, 16);
    bq = round_up(std::max<int64_t>(p.block_q, 16), 16);
    bk = round_up(std::max<int64_t>(p.block_k, 16), 16);
    nqb = (p.q_len + bq - 1) / bq;
    nkb = (p.kv_len + bk - 1) / bk;
    lq_pad = nqb * bq;
    lk_pad = nkb * bk;
    group = p.heads / p.kv_heads;
  }
};

Mask make_mask(const AttnParams& p, int64_t b) {
  return Mask{p, p.kv_len - p.q_len, p.q_seg ? p.q_seg + b * p.q_len : nullptr,
              p.k_seg ? p.k_seg + b * p.kv_len : nullptr};
}

}  // namespace

void attention_fwd(const AttnFwdArgs& a) {
  const AttnParams& p = a.p;
  const Geometry g(p);
  const int64_t B = p.batch, H = p.heads, Hk = p.kv_heads, D = p.head_dim, Dp = g.Dp;
  const int workers = num_threads();
  // K transposed in panels [B][Hk][nkb][Dp][bk] and V rows [B][Hk][lk_pad][Dp].
  Scratch kt(B * Hk * Dp * g.lk_pad), vr(B * Hk * g.lk_pad * Dp);
  parallel_for(B * Hk, workers, [&](int64_t t, int) {
    const int64_t b = t / Hk, h = t % Hk, off = t * Dp * g.lk_pad;
    pack_head(a.k + b * p.kv_len * Hk * D, p.kv_len, Hk, D, h, g.lk_pad, Dp, nullptr, &kt[off],
              g.bk);
    pack_head(a.v + b * p.kv_len * Hk * D, p.kv_len, Hk, D, h, g.lk_pad, Dp, &vr[off], nullptr,
              g.bk);
  });

  const int64_t scratch = g.bq * Dp * 2 + g.bq * g.bk + 2 * g.bq;
  Scratch work(static_cast<size_t>(workers) * scratch);
  parallel_for(B * H * g.nqb, workers, [&](int64_t t, int worker) {
    const int64_t qb = g.nqb - 1 - t % g.nqb, bh = t / g.nqb;  // heavy (late) blocks first
    const int64_t b = bh / H, h = bh % H, hk = h / g.group;
    const int64_t q0 = qb * g.bq, rows = std::min(g.bq, p.q_len - q0);
    float* qs = &work[worker * scratch];
    float* acc = qs + g.bq * Dp;
    float* s = acc + g.bq * Dp;
    float* m = s + g.bq * g.bk;
    float* l = m + g.bq;
    const float* qsrc = a.q + ((b * p.q_len + q0) * H + h) * D;
    std::fill(qs, qs + g.bq * Dp, 0.f);
    for (int64_t r = 0; r < rows; ++r) std::copy_n(qsrc + r * H * D, D, qs + r * Dp);
    std::fill(acc, acc + g.bq * Dp, 0.f);
    std::fill(m, m + g.bq, kNegInf);
    std::fill(l, l + g.bq, 0.f);

    const Mask mask = make_mask(p, b);
    const float* kt_h = &kt[(b * Hk + hk) * Dp * g.lk_pad];
    const float* v_h = &vr[(b * Hk + hk) * g.lk_pad * Dp];
    int64_t kb_lo, kb_hi;
    mask.key_blocks(q0, q0 + rows, g.bk, g.nkb, kb_lo, kb_hi);
    for (int64_t kb = kb_lo; kb < kb_hi; ++kb) {
      const int64_t k0 = kb * g.bk;
      gemm(rows, g.bk, Dp, qs, Dp, kt_h + kb * Dp * g.bk, g.bk, s, g.bk, false);
      const bool full = mask.full(q0, q0 + rows, k0, k0 + g.bk);
      for (int64_t r = 0; r < rows; ++r) {
        float* srow = s + r * g.bk;
        scale_and_cap(srow, g.bk, p.scale, p.softcap);
        if (!full)
          for (int64_t c = 0; c < g.bk; ++c)
            if (!mask.visible(q0 + r, k0 + c)) srow[c] = kNegInf;
        vf vmax = splat(kNegInf);
        for (int64_t c = 0; c < g.bk; c += W) {
          vf x = load(srow + c);
          vmax = x > vmax ? x : vmax;
        }
        const float m_new = std::max(m[r], hmax(vmax));
        const float m_use = m_new == kNegInf ? 0.f : m_new;
        const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - m_use);
        vf vsum{};
        for (int64_t c = 0; c < g.bk; c += W) {
          vf e = vexp(load(srow + c) - splat(m_use));
          store(srow + c, e);
          vsum += e;
        }
        l[r] = l[r] * alpha + hsum(vsum);
        m[r] = m_new;
        if (alpha != 1.f) {
          float* arow = acc + r * Dp;
          for (int64_t d = 0; d < Dp; d += W) store(arow + d, load(arow + d) * splat(alpha));
        }
      }
      gemm(rows, Dp, g.bk, s, g.bk, v_h + k0 * Dp, Dp, acc, Dp, true);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      float* dst = a.out + ((b * p.q_len + q0 + r) * H + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * Dp + d] * inv;
      a.lse[(b * H + h) * p.q_len + q0 + r] = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
    }
  });
}

namespace {
// p <- exp(s - lse) masked; s already scaled/capped/masked. lse_vec: per-column values (or null).
inline void probs(const float* s, float* pr, int64_t n, float lse_row, const float* lse_cols) {
  for (int64_t c = 0; c < n; c += W) {
    vf l = lse_cols ? load(lse_cols + c) : splat(lse_row);
    store(pr + c, vexp(load(s + c) - l));
  }
}
// ds <- p * (dp - delta) * softcap'(s) * scale, zero where p == 0 (masked).
inline void dscores(const float* s, const float* pr, float* dp, int64_t n, float delta_row,
                    const float* delta_cols, float scale, float cap) {
  for (int64_t c = 0; c < n; c += W) {
    vf dl = delta_cols ? load(delta_cols + c) : splat(delta_row);
    vf pv = load(pr + c);
    vf ds = pv * (load(dp + c) - dl) * splat(scale);
    if (cap > 0.f) {
      vf t = load(s + c) * splat(1.f / cap);
      ds = ds * (splat(1.f) - t * t);
    }
    store(dp + c, pv == vf{} ? vf{} : ds);
  }
}
}  // namespace

void attention_bwd(const AttnBwdArgs& a) {
  const AttnParams& p = a.p;
  const Geometry g(p);
  const int64_t B = p.batch, H = p.heads, Hk = p.kv_heads, D = p.head_dim, Dp = g.Dp;
  const int64_t Lq = p.q_len, Lk = p.kv_len, lqp = g.lq_pad, lkp = g.lk_pad;
  const int workers = num_threads();
  const int64_t qsz = lqp * Dp, ksz = lkp * Dp;
  Scratch qr(B * H * qsz), qt(B * H * qsz), dor(B * H * qsz), dot(B * H * qsz);
  Scratch kr(B * Hk * ksz), kt(B * Hk * ksz), vr(B * Hk * ksz), vt(B * Hk * ksz);
  Scratch lse(B * H * lqp, 0.f), delta(B * H * lqp, 0.f);
  parallel_for(B * H + B * Hk, workers, [&](int64_t t, int) {
    if (t < B * H) {
      const int64_t b = t / H, h = t % H;
      pack_head(a.q + b * Lq * H * D, Lq, H, D, h, lqp, Dp, &qr[t * qsz], &qt[t * qsz], g.bq);
      pack_head(a.dout + b * Lq * H * D, Lq, H, D, h, lqp, Dp, &dor[t * qsz], &dot[t * qsz],
                g.bq);
      for (int64_t i = 0; i < Lq; ++i) {
        const float x = a.lse[t * Lq + i];
        lse[t * lqp + i] = std::isinf(x) ? 0.f : x;  // empty rows: every p is masked to 0 anyway
        delta[t * lqp + i] = a.delta[t * Lq + i];
      }
    } else {
      t -= B * H;
      const int64_t b = t / Hk, h = t % Hk;
      pack_head(a.k + b * Lk * Hk * D, Lk, Hk, D, h, lkp, Dp, &kr[t * ksz], &kt[t * ksz], g.bk);
      pack_head(a.v + b * Lk * Hk * D, Lk, Hk, D, h, lkp, Dp, &vr[t * ksz], &vt[t * ksz], g.bk);
    }
  });

  const int64_t blk = std::max(g.bq, g.bk);
  const int64_t scratch = 3 * g.bq * g.bk + 2 * blk * Dp;
  Scratch work(static_cast<size_t>(workers) * scratch);

  // Pass 1: dq, one task per (b, h, query block).
  parallel_for(B * H * g.nqb, workers, [&](int64_t t, int worker) {
    const int64_t qb = g.nqb - 1 - t % g.nqb, bh = t / g.nqb;
    const int64_t b = bh / H, h = bh % H, bk_h = b * Hk + h / g.group;
    const int64_t q0 = qb * g.bq, rows = std::min(g.bq, Lq - q0);
    float* s = &work[worker * scratch];
    float* pr = s + g.bq * g.bk;
    float* dp = pr + g.bq * g.bk;
    float* acc = dp + g.bq * g.bk;
    std::fill(acc, acc + g.bq * Dp, 0.f);
    const Mask mask = make_mask(p, b);
    int64_t kb_lo, kb_hi;
    mask.key_blocks(q0, q0 + rows, g.bk, g.nkb, kb_lo, kb_hi);
    for (int64_t kb = kb_lo; kb < kb_hi; ++kb) {
      const int64_t k0 = kb * g.bk;
      gemm(rows, g.bk, Dp, &qr[bh * qsz + q0 * Dp], Dp, &kt[bk_h * ksz + kb * Dp * g.bk], g.bk, s,
           g.bk, false);
      gemm(rows, g.bk, Dp, &dor[bh * qsz + q0 * Dp], Dp, &vt[bk_h * ksz + kb * Dp * g.bk], g.bk,
           dp, g.bk, false);
      const bool full = mask.full(q0, q0 + rows, k0, k0 + g.bk);
      for (int64_t r = 0; r < rows; ++r) {
        float* srow = s + r * g.bk;
        scale_and_cap(srow, g.bk, p.scale, p.softcap);
        if (!full)
          for (int64_t c = 0; c < g.bk; ++c)
            if (!mask.visible(q0 + r, k0 + c)) srow[c] = kNegInf;
        probs(srow, pr + r * g.bk, g.bk, lse[bh * lqp + q0 + r], nullptr);
        dscores(srow, pr + r * g.bk, dp + r * g.bk, g.bk, delta[bh * lqp + q0 + r], nullptr,
                p.scale, p.softcap);
      }
      gemm(rows, Dp, g.bk, dp, g.bk, &kr[bk_h * ksz + k0 * Dp], Dp, acc, Dp, true);
    }
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(acc + r * Dp, D, a.dq + ((b * Lq + q0 + r) * H + h) * D);
  });

  // Pass 2: dk, dv, one task per (b, kv head, key block), summing over the query heads of
  // its group. Scores are computed transposed (keys x queries) so no block transposes are needed.
  parallel_for(B * Hk * g.nkb, workers, [&](int64_t t, int worker) {
    const int64_t kb = t % g.nkb, bk_h = t / g.nkb;
    const int64_t b = bk_h / Hk, hk = bk_h % Hk;
    const int64_t k0 = kb * g.bk, krows = std::min(g.bk, Lk - k0);
    float* s = &work[worker * scratch];
    float* pr = s + g.bq * g.bk;
    float* dp = pr + g.bq * g.bk;
    float* dk = dp + g.bq * g.bk;
    float* dv = dk + blk * Dp;
    std::fill(dk, dk + 2 * blk * Dp, 0.f);
    const Mask mask = make_mask(p, b);
    int64_t qb_lo, qb_hi;
    mask.query_blocks(k0, k0 + krows, g.bq, g.nqb, qb_lo, qb_hi);
    const float* k_rows = &kr[bk_h * ksz + k0 * Dp];
    const float* v_rows = &vr[bk_h * ksz + k0 * Dp];
    for (int64_t gi = 0; gi < g.group; ++gi) {
      const int64_t bh = b * H + hk * g.group + gi;
      for (int64_t qb = qb_lo; qb < qb_hi; ++qb) {
        const int64_t q0 = qb * g.bq;
        gemm(krows, g.bq, Dp, k_rows, Dp, &qt[bh * qsz + qb * Dp * g.bq], g.bq, s, g.bq, false);
        gemm(krows, g.bq, Dp, v_rows, Dp, &dot[bh * qsz + qb * Dp * g.bq], g.bq, dp, g.bq, false);
        const bool full = mask.full(q0, q0 + g.bq, k0, k0 + krows);
        for (int64_t r = 0; r < krows; ++r) {
          float* srow = s + r * g.bq;
          scale_and_cap(srow, g.bq, p.scale, p.softcap);
          if (!full)
            for (int64_t c = 0; c < g.bq; ++c)
              if (!mask.visible(q0 + c, k0 + r)) srow[c] = kNegInf;
          probs(srow, pr + r * g.bq, g.bq, 0.f, &lse[bh * lqp + q0]);
          dscores(srow, pr + r * g.bq, dp + r * g.bq, g.bq, 0.f, &delta[bh * lqp + q0], p.scale,
                  p.softcap);
        }
        gemm(krows, Dp, g.bq, pr, g.bq, &dor[bh * qsz + q0 * Dp], Dp, dv, Dp, true);
        gemm(krows, Dp, g.bq, dp, g.bq, &qr[bh * qsz + q0 * Dp], Dp, dk, Dp, true);
      }
    }
    for (int64_t r = 0; r < krows; ++r) {
      std::copy_n(dk + r * Dp, D, a.dk + ((b * Lk + k0 + r) * Hk + hk) * D);
      std::copy_n(dv + r * Dp, D, a.dv + ((b * Lk + k0 + r) * Hk + hk) * D);
    }
  });
}

const char* isa_name() {
#define LLMK_STR2(x) #x
#define LLMK_STR(x) LLMK_STR2(x)
  return LLMK_STR(LLMK_ISA);
}

}  // namespace LLMK_ISA
}  // namespace llmk
