// One decode step of attention over a paged (or contiguous) KV cache on the CPU: each (row, kv
// head) task reads only that row's own keys, [max(0, length - window), length), page by page in
// place, so a short request next to a long one pays for its own length, not the batch's longest
// (the jnp path gathers every row's pages up to the table width and masks). Online softmax over
// blocks of keys; the G query heads of a kv head share each key and value load. The cache is
// float32, bfloat16 or int8 with a scale per key and head (widened in registers; a key's scale
// multiplies its score, a value's its softmax weight); q, the softmax and the output are float32.
// Compiled once per ISA.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "kernels.h"
#include "simd.h"

namespace llmk {
namespace LLMK_ISA {
namespace {
constexpr int64_t kBlock = 64;  // keys per softmax block (a multiple of W)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A tree reduction: simd.h's lane-by-lane hsum would cost more than the dot product itself here
// (one per key and head).
inline float reduce_add(vf x) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(x));
#elif defined(__AVX__)
  const __m256 v = reinterpret_cast<__m256>(x);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#elif defined(__SSE3__)
  __m128 s = reinterpret_cast<__m128>(x);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  return hsum(x);
#endif
}

template <typename T>
inline float dot(const float* __restrict a, const T* __restrict b, int64_t d) {
  vf acc{};
  int64_t i = 0;
  for (; i + W <= d; i += W) acc += load(a + i) * load_widened(b + i);
  float s = reduce_add(acc);
  for (; i < d; ++i) s += a[i] * widen(b[i]);
  return s;
}

// y[0, U * W) += sum_j p[j] * v_j[0, U * W): U independent accumulator chains (one long chain over
// the keys would wait on the FMA latency at every key).
template <int U, typename T>
inline void accumulate_vectors(float* __restrict y, const float* __restrict p,
                               const T* const* vrows, int64_t n, int64_t offset) {
  vf acc[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) acc[u] = load(y + u * W);
  for (int64_t j = 0; j < n; ++j) {
    const vf pj = splat(p[j]);
    const T* v = vrows[j] + offset;
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) acc[u] += pj * load_widened(v + u * W);
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) store(y + u * W, acc[u]);
}

// y[0, d) += sum_j p[j] * v_j over the block's n keys.
template <typename T>
inline void accumulate(float* __restrict y, const float* __restrict p, const T* const* vrows,
                       int64_t n, int64_t d) {
  int64_t i = 0;
  for (; i + 8 * W <= d; i += 8 * W) accumulate_vectors<8>(y + i, p, vrows, n, i);
  if (i + 4 * W <= d) {
    accumulate_vectors<4>(y + i, p, vrows, n, i);
    i += 4 * W;
  }
  if (i + 2 * W <= d) {
    accumulate_vectors<2>(y + i, p, vrows, n, i);
    i += 2 * W;
  }
  if (i + W <= d) {
    accumulate_vectors<1>(y + i, p, vrows, n, i);
    i += W;
  }
  for (; i < d; ++i) {
    float acc = y[i];
    for (int64_t j = 0; j < n; ++j) acc += p[j] * widen(vrows[j][i]);
    y[i] = acc;
  }
}

template <typename T>  // the cache's element type: float, uint16_t bfloat16 bits, or int8_t
struct Task {
  const PagedDecodeArgs& a;
  const T *k, *v;
  int64_t b, kh, group;
  std::vector<float>& acc;  // [group, head_dim]
  std::vector<float>& s;    // [group, kBlock]
  std::vector<float>& ml;   // [2, group]: running max and sum of each query head

  // Pointers to the K and V rows of keys [t0, t0 + n), which may span pages, and (int8) their
  // scales.
  void rows(int64_t t0, int64_t n, const T** krows, const T** vrows, float* kscale,
            float* vscale) const {
    int64_t page_index = t0 / a.page_size, offset = t0 % a.page_size;
    for (int64_t j = 0; j < n;) {
      // a page id outside the pool is clamped into it (as XLA's gather does): never read past it
      const int64_t last = a.num_pages - 1;
      const int64_t page =
          a.table ? std::clamp<int64_t>(a.table[b * a.pages_per_row + page_index], 0, last) : b;
      const int64_t base = kh * a.kv_head_stride + page * a.page_stride;
      const int64_t scales = base / a.head_dim;  // the scales' layout has head_dim 1
      for (; offset < a.page_size && j < n; ++offset, ++j) {
        krows[j] = k + base + offset * a.head_dim;
        vrows[j] = v + base + offset * a.head_dim;
        kscale[j] = a.k_scale ? a.k_scale[scales + offset] : 1.f;
        vscale[j] = a.v_scale ? a.v_scale[scales + offset] : 1.f;
      }
      offset = 0;
      ++page_index;
    }
  }

  void run() {
    const int64_t d = a.head_dim;
    // the query sits at position lengths[b] - 1, which may lie past the cache (its keys do not)
    const int64_t query_len = std::max<int64_t>(a.lengths[b], 0);
    const int64_t len = std::min<int64_t>(query_len, a.page_size * a.pages_per_row);
    const int64_t start = a.window > 0 ? std::max<int64_t>(0, query_len - a.window) : 0;
    float* m = ml.data();
    float* l = ml.data() + group;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = kh * group + g;
      m[g] = a.sinks ? a.sinks[h] : kNegInf;  // a sink is one more logit, with no value
      l[g] = a.sinks ? 1.f : 0.f;
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    const float* q = a.q + (b * a.heads + kh * group) * d;
    const T* krows[kBlock];
    const T* vrows[kBlock];
    alignas(64) float kscale[kBlock], vscale[kBlock], weights[kBlock];
    for (int64_t t0 = start; t0 < len;) {
      const int64_t n = std::min(kBlock, len - t0);
      rows(t0, n, krows, vrows, kscale, vscale);
      for (int64_t g = 0; g < group; ++g) {
        float* sg = s.data() + g * kBlock;
        float mx = kNegInf;
        for (int64_t j = 0; j < n; ++j) {
          float x = dot(q + g * d, krows[j], d) * (a.scale * kscale[j]);
          if (a.softcap > 0.f) x = a.softcap * std::tanh(x / a.softcap);
          sg[j] = x;
          mx = std::max(mx, x);
        }
        const float m_new = std::max(m[g], mx);
        const float alpha = m[g] == kNegInf ? 0.f : std::exp(m[g] - m_new);
        vf sum{};
        for (int64_t j = 0; j < n; j += W) {  // the block's tail lanes are -inf: exp gives 0
          vf x = load(sg + j);
          for (int64_t lane = n - j; lane < W; ++lane) x[lane] = kNegInf;
          x = vexp(x - splat(m_new));
          store(sg + j, x);
          sum += x;
        }
        l[g] = l[g] * alpha + hsum(sum);
        m[g] = m_new;
        float* y = acc.data() + g * d;
        if (alpha != 1.f)
          for (int64_t i = 0; i < d; ++i) y[i] *= alpha;
        if (a.v_scale) {  // int8: each value row's scale joins its softmax weight
          for (int64_t j = 0; j < n; ++j) weights[j] = sg[j] * vscale[j];
          accumulate(y, weights, vrows, n, d);
        } else {
          accumulate(y, sg, vrows, n, d);
        }
      }
      t0 += n;
    }
    for (int64_t g = 0; g < group; ++g) {
      float* out = a.out + (b * a.heads + kh * group + g) * d;
      const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;  // no key and no sink: zeros
      for (int64_t i = 0; i < d; ++i) out[i] = acc[g * d + i] * inv;
    }
  }
};

template <typename T>
void run_task(const PagedDecodeArgs& a, int64_t b, int64_t kh, int64_t group,
              std::vector<float>& acc, std::vector<float>& s, std::vector<float>& ml) {
  const auto* k = static_cast<const T*>(a.k);
  Task<T>{a, k, static_cast<const T*>(a.v), b, kh, group, acc, s, ml}.run();
}
}  // namespace

void paged_decode_attention(const PagedDecodeArgs& a) {
  const int64_t group = a.heads / a.kv_heads;
  thread_local std::vector<float> acc, s, ml;  // reused across tasks: no allocation per task
  acc.resize(group * a.head_dim);
  s.resize(group * kBlock + W);
  ml.resize(2 * group);
  for (int64_t task = a.t0; task < a.t1; ++task) {
    const int64_t b = task / a.kv_heads, kh = task % a.kv_heads;
    switch (a.cache_type) {
      case PagedDecodeArgs::kBF16:
        run_task<uint16_t>(a, b, kh, group, acc, s, ml);
        break;
      case PagedDecodeArgs::kI8:
        run_task<int8_t>(a, b, kh, group, acc, s, ml);
        break;
      default:
        run_task<float>(a, b, kh, group, acc, s, ml);
    }
  }
}

}  // namespace LLMK_ISA
}  // namespace llmk
