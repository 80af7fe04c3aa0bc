// Plain-C++ interface of the CPU kernels, independent of XLA. Each ISA build (base/avx2/avx512)
// defines the same functions in its own namespace; dispatch.cc picks one at runtime.
#pragma once
#include <cstdint>

namespace llmk {

struct AttnParams {
  int64_t batch, q_len, kv_len, heads, kv_heads, head_dim;
  bool causal;
  int64_t window;   // 0: no sliding window
  float softcap;    // 0: no soft-capping
  float scale;
  int64_t block_q, block_k;
  const int32_t* q_seg;  // [batch, q_len] or nullptr
  const int32_t* k_seg;  // [batch, kv_len] or nullptr
};

struct AttnFwdArgs {
  AttnParams p;
  const float *q, *k, *v;  // [B, Lq, H, D], [B, Lk, Hkv, D] x2
  float* out;              // [B, Lq, H, D]
  float* lse;              // [B, H, Lq]
};

struct AttnBwdArgs {
  AttnParams p;
  const float *q, *k, *v, *dout;  // like forward
  const float *lse, *delta;        // [B, H, Lq]
  float *dq, *dk, *dv;
};

struct RmsNormArgs {
  int64_t rows, dim, rows_per_weight;  // x: [rows, dim], weight: [rows / rows_per_weight, dim]
  float eps;
  const float *x, *weight, *dy;  // dy only for backward
  float *y, *dx, *dweight;       // y for forward; dx, dweight for backward
};

// Grouped matmul: rows of lhs [m, k] sorted by group; group i has group_sizes[i] rows.
struct GmmArgs {
  int64_t m, k, n, groups;
  const int32_t* group_sizes;
  const float *lhs, *rhs;  // rhs [groups, k, n], or [groups, n, k] when transpose_rhs
  bool transpose_rhs;
  float* out;  // [m, n]; rows past the groups are zeros
};

struct TgmmArgs {
  int64_t m, k, n, groups;
  const int32_t* group_sizes;
  const float *lhs, *dout;  // [m, k], [m, n]
  float* out;               // [groups, k, n]; out[i] = lhs_i^T dout_i
};

// Weight-only int8 matmul: out[m, n] = scale[n] * sum_k x[m, k] * q[k, n].
struct Int8MatmulArgs {
  int64_t m, k, n;
  const float* x;       // [m, k]
  const int8_t* q;      // [k, n]
  const float* scale;   // [n]
  float* y;             // [m, n]
};

struct Int4MatmulArgs {
  int64_t m, k, n, group;
  const float* x;       // [m, k]
  const uint8_t* q;     // [k / 2, n], two int4 per byte along k (low nibble: even row)
  const float* scale;   // [k / group, n]
  float* y;             // [m, n]
};

// Float32 matmul on panel-packed weights: out[m, n] = sum_k x[m, k] * w[k, n], w stored as
// [panels, k, kPackedPanel] (column j of panel p is column p * kPackedPanel + j, zero-padded).
constexpr int kPackedPanel = 32;
struct PackedMatmulArgs {
  int64_t m, k, n;
  int64_t p0, p1;       // the panels this call computes
  const float* x;       // [m, k]
  const float* w;       // [ceil(n / kPackedPanel), k, kPackedPanel]
  const uint16_t* w_bf16;  // the same in bfloat16 (then w is unused), or nullptr
  float* y;             // [m, n]
};

// One decode step of attention: q [batch, heads, head_dim] over each row's first lengths[b] keys.
// Key t of row b, kv head h is at k + h * kv_head_stride + page * page_stride + (t % page_size) *
// head_dim with page = table[b, t / page_size] (paged pools [K, P, page_size, D]), or page = b
// when table is null (a contiguous [B, K, L, D] cache: page_size = L, one page per row).
struct PagedDecodeArgs {
  int64_t batch, heads, kv_heads, head_dim;
  int64_t page_size, pages_per_row, num_pages;  // num_pages: of the pool (contiguous: batch)
  int64_t kv_head_stride, page_stride;  // in floats
  const float* q;
  const void *k, *v;       // float, bfloat16 bits (uint16_t) or int8, as cache_type says
  enum CacheType { kF32, kBF16, kI8 } cache_type;
  // int8 caches: a float32 scale per key and kv head, laid out as k / v with head_dim 1
  const float *k_scale, *v_scale;
  const int32_t* lengths;  // [batch]
  const int32_t* table;    // [batch, pages_per_row] or nullptr
  const float* sinks;      // [heads] or nullptr: one more logit per head, attending to nothing
  int64_t window;          // 0: none; else keys t > length - 1 - window
  float softcap;           // 0: none
  float scale;
  float* out;              // [batch, heads, head_dim]
  int64_t t0, t1;          // the (row, kv head) tasks b * kv_heads + h this call computes
};

#define LLMK_DECLARE_KERNELS(ns)                 \
  namespace ns {                                 \
  void attention_fwd(const AttnFwdArgs& a);      \
  void attention_bwd(const AttnBwdArgs& a);      \
  void rms_norm_fwd(const RmsNormArgs& a);       \
  void rms_norm_bwd(const RmsNormArgs& a);       \
  void gmm(const GmmArgs& a);                    \
  void tgmm(const TgmmArgs& a);                  \
  void int8_matmul(const Int8MatmulArgs& a);     \
  void int4_matmul(const Int4MatmulArgs& a);     \
  void packed_matmul(const PackedMatmulArgs& a); \
  void paged_decode_attention(const PagedDecodeArgs& a); \
  const char* isa_name();                        \
  }

LLMK_DECLARE_KERNELS(base)
LLMK_DECLARE_KERNELS(avx2)
LLMK_DECLARE_KERNELS(avx512)

// Runtime-dispatched entry points (dispatch.cc).
void attention_fwd(const AttnFwdArgs& a);
void attention_bwd(const AttnBwdArgs& a);
void rms_norm_fwd(const RmsNormArgs& a);
void rms_norm_bwd(const RmsNormArgs& a);
void gmm(const GmmArgs& a);
void tgmm(const TgmmArgs& a);
void int8_matmul(const Int8MatmulArgs& a);
void int4_matmul(const Int4MatmulArgs& a);
void packed_matmul(const PackedMatmulArgs& a);
void paged_decode_attention(const PagedDecodeArgs& a);
const char* isa_name();

}  // namespace llmk
