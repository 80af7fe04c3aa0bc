// Float32 matmul on packed weights: y[m, n] = sum_k x[m, k] * w[k, n], with w stored in panels of
// kPanel columns, [panels, k, kPanel] (the last panel zero-padded). XLA:CPU's matmul reads a
// row-major [k, n] weight with a stride of n floats per k, and at decode's few rows it reaches a
// third of the memory bandwidth; a panel is one contiguous stream, and each of its rows feeds up to
// 8 rows of x from registers. Large m (prefill) runs the row blocks over a panel held in cache.
// Weights in float32 or bfloat16 (widened in registers: half the bytes streamed).
// Compiled once per ISA (LLMK_ISA); panels [p0, p1) per call, split over threads by the handler.
#include <algorithm>
#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace llmk {
namespace LLMK_ISA {
namespace {
constexpr int kVec = kPackedPanel / W;  // vectors per panel row

template <int kRows, typename T>
inline void panel_rows(const float* __restrict x, int64_t ldx, const T* __restrict panel,
                       int64_t k, float* __restrict y, int64_t ldy, int64_t cols) {
  vf acc[kRows][kVec];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kVec; ++v) acc[r][v] = vf{};
  for (int64_t i = 0; i < k; ++i) {
    const T* w = panel + i * kPackedPanel;
    __builtin_prefetch(w + 8 * kPackedPanel);
    __builtin_prefetch(w + 8 * kPackedPanel + 16);
    vf wv[kVec];
#pragma GCC unroll 8
    for (int v = 0; v < kVec; ++v) wv[v] = load_widened(w + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const vf xv = splat(x[r * ldx + i]);
#pragma GCC unroll 8
      for (int v = 0; v < kVec; ++v) acc[r][v] += xv * wv[v];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    if (cols == kPackedPanel) {
      for (int v = 0; v < kVec; ++v) store(y + r * ldy + v * W, acc[r][v]);
    } else {
      alignas(64) float row[kPackedPanel];
      for (int v = 0; v < kVec; ++v) store(row + v * W, acc[r][v]);
      std::memcpy(y + r * ldy, row, cols * sizeof(float));
    }
  }
}

template <typename T>
void packed_panels(const PackedMatmulArgs& a, const T* weights) {
  for (int64_t p = a.p0; p < a.p1; ++p) {
    const T* panel = weights + p * a.k * kPackedPanel;
    const int64_t n0 = p * kPackedPanel, cols = std::min<int64_t>(kPackedPanel, a.n - n0);
    const float* x = a.x;
    float* y = a.y + n0;
    int64_t m = 0;
    for (; m + 8 <= a.m; m += 8)
      panel_rows<8>(x + m * a.k, a.k, panel, a.k, y + m * a.n, a.n, cols);
    if (m + 4 <= a.m) {
      panel_rows<4>(x + m * a.k, a.k, panel, a.k, y + m * a.n, a.n, cols);
      m += 4;
    }
    if (m + 2 <= a.m) {
      panel_rows<2>(x + m * a.k, a.k, panel, a.k, y + m * a.n, a.n, cols);
      m += 2;
    }
    if (m < a.m) panel_rows<1>(x + m * a.k, a.k, panel, a.k, y + m * a.n, a.n, cols);
  }
}
}  // namespace

void packed_matmul(const PackedMatmulArgs& a) {
  if (a.w_bf16)
    packed_panels(a, a.w_bf16);
  else
    packed_panels(a, a.w);
}

}  // namespace LLMK_ISA
}  // namespace llmk
