// Weight-only grouped int4 matmul: y[m, n] = sum_g scale[g, n] * sum_{k in group g} x[m, k] q[k, n]
// (x float32 [M, K]; q int4 packed two per byte along K, [K / 2, N], row 2p in the low nibble of
// byte row p and row 2p + 1 in the high one; scale [K / group, N]). XLA:CPU unpacks and dequantizes
// q into a float32 copy before its matmul (8 bytes written per byte read); here each byte row is
// unpacked in registers and used for up to kRows rows of x, so a decode step reads half a byte per
// weight. Compiled once per ISA (LLMK_ISA).
#include <algorithm>

#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace llmk {
namespace LLMK_ISA {
namespace {
constexpr int64_t kCols = 256;  // output columns per task
constexpr int64_t kRows = 8;    // rows of x sharing each unpacked weight segment
}  // namespace

void int4_matmul(const Int4MatmulArgs& a) {
  const int64_t col_blocks = (a.n + kCols - 1) / kCols;
  const int64_t row_blocks = (a.m + kRows - 1) / kRows;
  const int64_t tasks = col_blocks * row_blocks;  // column-block major: weights stay in cache
  const int64_t groups = a.k / a.group;
  const int workers = a.m * a.n * a.k < (int64_t{1} << 20) ? 1 : num_threads();
  parallel_for(tasks, workers, [&](int64_t t, int) {
    const int64_t n0 = (t / row_blocks) * kCols, m0 = (t % row_blocks) * kRows;
    const int64_t nc = std::min(kCols, a.n - n0), mc = std::min(kRows, a.m - m0);
    alignas(64) float acc[kRows][kCols] = {};
    alignas(64) float part[kRows][kCols];
    alignas(64) float w0[kCols], w1[kCols];
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t r = 0; r < mc; ++r) std::fill(part[r], part[r] + nc, 0.0f);
      for (int64_t p = g * a.group / 2; p < (g + 1) * a.group / 2; ++p) {
        const uint8_t* q = a.q + p * a.n + n0;
        for (int64_t j = 0; j < nc; ++j) {  // sign-extend each nibble with arithmetic shifts
          const int8_t b = static_cast<int8_t>(q[j]);
          w0[j] = static_cast<float>(static_cast<int8_t>(b << 4) >> 4);
          w1[j] = static_cast<float>(b >> 4);
        }
        for (int64_t r = 0; r < mc; ++r) {
          const float x0 = a.x[(m0 + r) * a.k + 2 * p], x1 = a.x[(m0 + r) * a.k + 2 * p + 1];
          float* out = part[r];
          for (int64_t j = 0; j < nc; ++j) out[j] += x0 * w0[j] + x1 * w1[j];
        }
      }
      const float* s = a.scale + g * a.n + n0;
      for (int64_t r = 0; r < mc; ++r)
        for (int64_t j = 0; j < nc; ++j) acc[r][j] += part[r][j] * s[j];
    }
    for (int64_t r = 0; r < mc; ++r) std::copy(acc[r], acc[r] + nc, a.y + (m0 + r) * a.n + n0);
  });
}

}  // namespace LLMK_ISA
}  // namespace llmk
