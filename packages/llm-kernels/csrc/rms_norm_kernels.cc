// Fused RMSNorm forward and backward over rows of a [rows, dim] float32 matrix; one pass per row
// over memory that XLA would otherwise read several times. Compiled once per ISA (LLMK_ISA).
// Reductions use explicit SIMD lanes: without -ffast-math the compiler keeps float sums scalar.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "scratch.h"
#include "simd.h"

namespace llmk {
namespace LLMK_ISA {
namespace {
constexpr int64_t kRowsPerTask = 8;

inline float inv_rms(const float* x, int64_t dim, float eps) {
  vf acc{};
  int64_t d = 0;
  for (; d + W <= dim; d += W) {
    vf v = load(x + d);
    acc += v * v;
  }
  float ss = hsum(acc);
  for (; d < dim; ++d) ss += x[d] * x[d];
  return 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
}
}  // namespace

void rms_norm_fwd(const RmsNormArgs& a) {
  const int64_t tasks = (a.rows + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(tasks, num_threads(), [&](int64_t t, int) {
    const int64_t r1 = std::min(a.rows, (t + 1) * kRowsPerTask);
    for (int64_t r = t * kRowsPerTask; r < r1; ++r) {
      const float* x = a.x + r * a.dim;
      const float* w = a.weight + (r / a.rows_per_weight) * a.dim;
      float* y = a.y + r * a.dim;
      const float rs = inv_rms(x, a.dim, a.eps);
      for (int64_t d = 0; d < a.dim; ++d) y[d] = x[d] * rs * w[d];
    }
  });
}

// dx = rs * (w*dy - xhat * mean(xhat * w * dy)),  dweight = sum_rows dy * xhat.
void rms_norm_bwd(const RmsNormArgs& a) {
  const int64_t n_weights = a.rows / a.rows_per_weight;
  const int workers = num_threads();
  const int64_t tasks = (a.rows + kRowsPerTask - 1) / kRowsPerTask;
  // Per-worker partial sums of dweight, reduced at the end.
  Scratch partial(static_cast<size_t>(workers) * n_weights * a.dim, 0.f);
  parallel_for(tasks, workers, [&](int64_t t, int worker) {
    const int64_t r1 = std::min(a.rows, (t + 1) * kRowsPerTask);
    for (int64_t r = t * kRowsPerTask; r < r1; ++r) {
      const int64_t wi = r / a.rows_per_weight;
      const float* x = a.x + r * a.dim;
      const float* dy = a.dy + r * a.dim;
      const float* w = a.weight + wi * a.dim;
      float* dx = a.dx + r * a.dim;
      float* dw = &partial[(worker * n_weights + wi) * a.dim];
      const float rs = inv_rms(x, a.dim, a.eps);
      vf acc{};
      int64_t d = 0;
      for (; d + W <= a.dim; d += W) acc += load(x + d) * load(w + d) * load(dy + d);
      float dot = hsum(acc);
      for (; d < a.dim; ++d) dot += x[d] * w[d] * dy[d];
      const float mean = dot * rs / static_cast<float>(a.dim);
      for (d = 0; d < a.dim; ++d) {
        const float xhat = x[d] * rs;
        dx[d] = rs * (w[d] * dy[d] - xhat * mean);
        dw[d] += dy[d] * xhat;
      }
    }
  });
  const int64_t total = n_weights * a.dim;
  std::fill(a.dweight, a.dweight + total, 0.f);
  for (int w = 0; w < workers; ++w)
    for (int64_t i = 0; i < total; ++i) a.dweight[i] += partial[w * total + i];
}

}  // namespace LLMK_ISA
}  // namespace llmk
