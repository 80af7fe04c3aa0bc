// Portable SIMD helpers on GCC/Clang vector extensions: the same source becomes SSE, AVX2 or
// AVX-512 code depending on the -march of the translation unit that includes it.
#pragma once
#include <cstdint>
#include <cstring>

namespace llmk {
namespace LLMK_ISA {

#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef float vf_u __attribute__((vector_size(W * 4), aligned(4)));  // unaligned access

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }

// bfloat16 storage (uint16_t bits) is the top half of a float32: widening is a shift.
typedef uint16_t vh_u __attribute__((vector_size(W * 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
inline vf load_widened(const float* p) { return load(p); }
inline vf load_widened(const uint16_t* p) {
  const vu bits = __builtin_convertvector(*reinterpret_cast<const vh_u*>(p), vu) << 16;
  return (vf)bits;
}
// int8 (a quantized cache): exact in float32; the caller applies the scale.
typedef int8_t vb_u __attribute__((vector_size(W), aligned(1)));
inline vf load_widened(const int8_t* p) {
  const vi widened = __builtin_convertvector(*reinterpret_cast<const vb_u*>(p), vi);
  return __builtin_convertvector(widened, vf);
}
inline float widen(int8_t x) { return static_cast<float>(x); }
inline float widen(float x) { return x; }
inline float widen(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store(float* p, vf x) { *reinterpret_cast<vf_u*>(p) = x; }
// `x - 0`, not `0 + x`: only the former is an identity in IEEE arithmetic (0 + -0 = +0), so only
// it folds to a single broadcast load instead of a scalar add before every broadcast.
inline vf splat(float x) { return x - vf{}; }

inline float hsum(vf x) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += x[i];
  return s;
}
inline float hmax(vf x) {
  float m = x[0];
  for (int i = 1; i < W; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// exp(x) for float lanes, ~1e-7 relative error; returns exactly 0 below -87.3 (incl. -inf).
inline vf vexp(vf x) {
  const vf lo = splat(-87.3f);
  vf xc = x < lo ? lo : x;
  xc = xc > splat(88.3f) ? splat(88.3f) : xc;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: round-to-nearest trick
  vf t = xc * splat(1.44269504088896341f) + magic;
  vf n = t - magic;
  vf r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.0f / 5040);
  p = p * r + splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  vi ni = (vi)t - (vi)magic;  // same-size vector casts reinterpret bits
  vi bits = (ni + 127) << 23;
  vf res = p * (vf)bits;
  return x < lo ? vf{} : res;
}

// tanh(x) = sign(x) * (1 - e) / (1 + e), e = exp(-2|x|).
inline vf vtanh(vf x) {
  vf ax = x < vf{} ? -x : x;
  vf e = vexp(splat(-2.f) * ax);
  vf t = (splat(1.f) - e) / (splat(1.f) + e);
  return x < vf{} ? -t : t;
}

// C[M x N] (+)= A[M x K] * B[K x N]; row-major with leading dims; N must be a multiple of W.
// Register tile: 4 rows x 2 vectors, broadcasting A and streaming rows of B.
inline void gemm(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc, bool accumulate) {
  int i = 0;
  for (; i + 4 <= M; i += 4) {
    const float* a0 = A + (i + 0) * lda;
    const float* a1 = A + (i + 1) * lda;
    const float* a2 = A + (i + 2) * lda;
    const float* a3 = A + (i + 3) * lda;
    float* c0 = C + (i + 0) * ldc;
    float* c1 = C + (i + 1) * ldc;
    float* c2 = C + (i + 2) * ldc;
    float* c3 = C + (i + 3) * ldc;
    int j = 0;
    for (; j + 2 * W <= N; j += 2 * W) {
      vf x00{}, x01{}, x10{}, x11{}, x20{}, x21{}, x30{}, x31{};
      if (accumulate) {
        x00 = load(c0 + j); x01 = load(c0 + j + W);
        x10 = load(c1 + j); x11 = load(c1 + j + W);
        x20 = load(c2 + j); x21 = load(c2 + j + W);
        x30 = load(c3 + j); x31 = load(c3 + j + W);
      }
      const float* b = B + j;
      for (int k = 0; k < K; ++k, b += ldb) {
        vf b0 = load(b), b1 = load(b + W);
        vf a;
        a = splat(a0[k]); x00 += a * b0; x01 += a * b1;
        a = splat(a1[k]); x10 += a * b0; x11 += a * b1;
        a = splat(a2[k]); x20 += a * b0; x21 += a * b1;
        a = splat(a3[k]); x30 += a * b0; x31 += a * b1;
      }
      store(c0 + j, x00); store(c0 + j + W, x01);
      store(c1 + j, x10); store(c1 + j + W, x11);
      store(c2 + j, x20); store(c2 + j + W, x21);
      store(c3 + j, x30); store(c3 + j + W, x31);
    }
    for (; j < N; j += W) {
      vf x0{}, x1{}, x2{}, x3{};
      if (accumulate) { x0 = load(c0 + j); x1 = load(c1 + j); x2 = load(c2 + j); x3 = load(c3 + j); }
      const float* b = B + j;
      for (int k = 0; k < K; ++k, b += ldb) {
        vf b0 = load(b);
        x0 += splat(a0[k]) * b0; x1 += splat(a1[k]) * b0;
        x2 += splat(a2[k]) * b0; x3 += splat(a3[k]) * b0;
      }
      store(c0 + j, x0); store(c1 + j, x1); store(c2 + j, x2); store(c3 + j, x3);
    }
  }
  for (; i < M; ++i) {
    const float* a0 = A + i * lda;
    float* c0 = C + i * ldc;
    for (int j = 0; j < N; j += W) {
      vf x0 = accumulate ? load(c0 + j) : vf{};
      const float* b = B + j;
      for (int k = 0; k < K; ++k, b += ldb) x0 += splat(a0[k]) * load(b);
      store(c0 + j, x0);
    }
  }
}

}  // namespace LLMK_ISA
}  // namespace llmk
