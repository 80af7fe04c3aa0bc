// Weight-only int8 matmul: y[m, n] = scale[n] * sum_k x[m, k] * q[k, n] (x float32 [M, K], q int8
// [K, N], per-output-channel scales). XLA:CPU dequantizes q into a float32 copy before its matmul
// (a separate, slow pass writing 4 bytes per weight); here each int8 row segment is widened in
// registers and used for up to kRows rows of x, so a decode step reads 1 byte per weight.
// Compiled once per ISA (LLMK_ISA).
#include <algorithm>

#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace llmk {
namespace LLMK_ISA {
namespace {
constexpr int64_t kCols = 256;  // output columns per task: kRows x kCols float accumulators
constexpr int64_t kRows = 8;    // rows of x sharing each widened weight segment
}  // namespace

void int8_matmul(const Int8MatmulArgs& a) {
  const int64_t col_blocks = (a.n + kCols - 1) / kCols;
  const int64_t row_blocks = (a.m + kRows - 1) / kRows;
  // consecutive tasks share a column block, so its weights stay in cache across row blocks
  const int64_t tasks = col_blocks * row_blocks;
  const int workers = a.m * a.n * a.k < (int64_t{1} << 20) ? 1 : num_threads();
  parallel_for(tasks, workers, [&](int64_t t, int) {
    const int64_t n0 = (t / row_blocks) * kCols, m0 = (t % row_blocks) * kRows;
    const int64_t nc = std::min(kCols, a.n - n0), mc = std::min(kRows, a.m - m0);
    alignas(64) float acc[kRows][kCols] = {};
    alignas(64) float w[kCols];
    for (int64_t k = 0; k < a.k; ++k) {
      const int8_t* q = a.q + k * a.n + n0;
      for (int64_t j = 0; j < nc; ++j) w[j] = static_cast<float>(q[j]);
      for (int64_t r = 0; r < mc; ++r) {
        const float xv = a.x[(m0 + r) * a.k + k];
        float* out = acc[r];
        for (int64_t j = 0; j < nc; ++j) out[j] += xv * w[j];
      }
    }
    for (int64_t r = 0; r < mc; ++r) {
      float* y = a.y + (m0 + r) * a.n + n0;
      for (int64_t j = 0; j < nc; ++j) y[j] = acc[r][j] * a.scale[n0 + j];
    }
  });
}

}  // namespace LLMK_ISA
}  // namespace llmk
