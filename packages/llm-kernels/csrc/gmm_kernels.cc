// Grouped matmul on the CPU (MoE experts): per-group GEMMs over contiguous row blocks, never the
// dense [groups, rows, k] blow-up of a masked matmul. Compiled once per ISA (LLMK_ISA).
//
// Each group's product is a BLIS-style packed GEMM: a KC x NC block of B is packed into NR-wide
// column panels (kept in L2), MC x KC blocks of A into MR-high row panels, and a 6 x 2W register
// micro-kernel walks them. Operands are read through (row stride, column stride) views, so the
// transposed forms (transpose_rhs, and lhs^T in the rhs gradient) only change the packing.
// Work is split over (group, column block, row chunk) tasks claimed from a shared counter.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "scratch.h"
#include "simd.h"

namespace llmk {
namespace LLMK_ISA {
namespace {

// 2 x MR vector accumulators: 12 of 16 registers below AVX-512, 24 of 32 with it.
constexpr int MR = W == 16 ? 12 : 6;
constexpr int NR = 2 * W;
#ifndef LLMK_GMM_KC
#define LLMK_GMM_KC 256
#endif
constexpr int64_t KC = LLMK_GMM_KC;
constexpr int64_t NC = 256;        // multiple of NR for every W in {4, 8, 16}
constexpr int64_t MC = 8 * MR * (W == 16 ? 1 : 2);

// A strided matrix view: element (i, j) at p[i * rs + j * cs].
struct View {
  const float* p;
  int64_t rs, cs;
  float at(int64_t i, int64_t j) const { return p[i * rs + j * cs]; }
};

// Bp[panel][k][NR] for columns [j0, j0 + nc) and rows [p0, p0 + kc) of B; zero-padded columns.
void pack_b(const View& b, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* bp) {
  for (int64_t jp = 0; jp < nc; jp += NR) {
    const int64_t cols = std::min<int64_t>(NR, nc - jp);
    float* panel = bp + jp * kc;
    for (int64_t k = 0; k < kc; ++k) {
      float* dst = panel + k * NR;
      if (b.cs == 1) {
        std::memcpy(dst, b.p + (p0 + k) * b.rs + j0 + jp, cols * sizeof(float));
      } else {
        for (int64_t c = 0; c < cols; ++c) dst[c] = b.at(p0 + k, j0 + jp + c);
      }
      for (int64_t c = cols; c < NR; ++c) dst[c] = 0.f;
    }
  }
}

// Ap[panel][k][MR] for rows [i0, i0 + mc) and columns [p0, p0 + kc) of A; zero-padded rows.
void pack_a(const View& a, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* ap) {
  for (int64_t ip = 0; ip < mc; ip += MR) {
    const int64_t rows = std::min<int64_t>(MR, mc - ip);
    float* panel = ap + ip * kc;
    if (a.rs == 1) {  // A(i, p) contiguous over i: copy MR-long runs
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = a.p + (p0 + k) * a.cs + i0 + ip;
        float* dst = panel + k * MR;
        for (int64_t r = 0; r < rows; ++r) dst[r] = src[r];
        for (int64_t r = rows; r < MR; ++r) dst[r] = 0.f;
      }
    } else {
      for (int64_t r = 0; r < MR; ++r) {
        float* dst = panel + r;
        if (r < rows) {
          const float* src = a.p + (i0 + ip + r) * a.rs + p0 * a.cs;
          for (int64_t k = 0; k < kc; ++k) dst[k * MR] = src[k * a.cs];
        } else {
          for (int64_t k = 0; k < kc; ++k) dst[k * MR] = 0.f;
        }
      }
    }
  }
}

// C[MR x NR] (+)= Ap panel * Bp panel, written to c with leading dim ldc. The MR x 2 vector
// accumulators stay in registers (the loops over r have constant bounds and are unrolled).
inline void micro_kernel(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc,
                         bool accumulate) {
  vf acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = vf{};
  for (int64_t k = 0; k < kc; ++k, ap += MR, bp += NR) {
    const vf b0 = load(bp), b1 = load(bp + W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vf a = splat(ap[r]);
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* row = c + r * ldc;
    if (accumulate) {
      store(row, load(row) + acc[r][0]);
      store(row + W, load(row + W) + acc[r][1]);
    } else {
      store(row, acc[r][0]);
      store(row + W, acc[r][1]);
    }
  }
}

struct Workspace {
  Scratch bp, ap;
  float tile[MR * NR];
  Workspace() : bp(KC * NC), ap(MC * KC) {}
};

// C[rows [i0, i1), cols [j0, j1)] = A[i0:i1, :K] * B[:K, j0:j1]; C has leading dim ldc.
void gemm_block(const View& a, const View& b, int64_t K, float* c, int64_t ldc, int64_t i0,
                int64_t i1, int64_t j0, int64_t j1, Workspace& ws) {
  const int64_t nc = j1 - j0;
  if (K == 0) {
    for (int64_t i = i0; i < i1; ++i) std::fill(c + i * ldc + j0, c + i * ldc + j1, 0.f);
    return;
  }
  for (int64_t p0 = 0; p0 < K; p0 += KC) {
    const int64_t kc = std::min(KC, K - p0);
    const bool accumulate = p0 > 0;
    pack_b(b, p0, kc, j0, nc, ws.bp.data());
    for (int64_t ic = i0; ic < i1; ic += MC) {
      const int64_t mc = std::min(MC, i1 - ic);
      pack_a(a, ic, mc, p0, kc, ws.ap.data());
      for (int64_t jr = 0; jr < nc; jr += NR) {
        const int64_t cols = std::min<int64_t>(NR, nc - jr);
        const float* bpanel = ws.bp.data() + jr * kc;
        for (int64_t ir = 0; ir < mc; ir += MR) {
          const int64_t rows = std::min<int64_t>(MR, mc - ir);
          const float* apanel = ws.ap.data() + ir * kc;
          float* dst = c + (ic + ir) * ldc + j0 + jr;
          if (rows == MR && cols == NR) {
            micro_kernel(kc, apanel, bpanel, dst, ldc, accumulate);
            continue;
          }
          micro_kernel(kc, apanel, bpanel, ws.tile, NR, false);  // edge: via a full tile
          for (int64_t r = 0; r < rows; ++r) {
            float* out = dst + r * ldc;
            const float* t = ws.tile + r * NR;
            for (int64_t j = 0; j < cols; ++j) out[j] = accumulate ? out[j] + t[j] : t[j];
          }
        }
      }
    }
  }
}

// One group's product: rows [0, M) and columns [0, N) of C_g = A_g (M x K) * B_g (K x N).
struct GroupProblem {
  View a, b;
  int64_t M, K;
  float* c;
};

// Runs every group's product over (group, column block, row chunk) tasks on all threads.
void run_groups(const std::vector<GroupProblem>& problems, int64_t N, int64_t ldc) {
  if (N == 0) return;
  struct Task {
    int32_t group;
    int64_t i0, i1, j0, j1;
  };
  // Split rows only when whole-group tasks are too few to keep every thread busy: each task
  // packs its own copy of B, so a row split re-reads the weights.
  const int64_t col_blocks = (N + NC - 1) / NC;
  const int64_t threads = num_threads();
  int64_t row_chunk = int64_t{1} << 40;
  if (static_cast<int64_t>(problems.size()) * col_blocks < 4 * threads) {
    int64_t total_rows = 0;
    for (const auto& pr : problems) total_rows += pr.M;
    row_chunk = std::max<int64_t>(MC, total_rows / (4 * threads * col_blocks) / MC * MC);
  }
  std::vector<Task> tasks;
  for (size_t g = 0; g < problems.size(); ++g) {
    const int64_t M = problems[g].M;
    for (int64_t i0 = 0; i0 < M; i0 += row_chunk)
      for (int64_t j0 = 0; j0 < N; j0 += NC)
        tasks.push_back({static_cast<int32_t>(g), i0, std::min(M, i0 + row_chunk), j0,
                         std::min(N, j0 + NC)});
  }
  const int workers = static_cast<int>(std::min<int64_t>(threads, tasks.size()));
  std::vector<Workspace> ws(std::max(workers, 1));
  parallel_for(static_cast<int64_t>(tasks.size()), workers, [&](int64_t t, int worker) {
    const Task& task = tasks[t];
    const GroupProblem& pr = problems[task.group];
    gemm_block(pr.a, pr.b, pr.K, pr.c, ldc, task.i0, task.i1, task.j0, task.j1, ws[worker]);
  });
}

}  // namespace

void gmm(const GmmArgs& g) {
  // Rows past the groups (or past m) are zeros; groups are cut at m.
  std::vector<GroupProblem> problems;
  int64_t start = 0;
  for (int64_t i = 0; i < g.groups; ++i) {
    const int64_t size = std::min<int64_t>(std::max<int32_t>(g.group_sizes[i], 0), g.m - start);
    if (size > 0) {
      const float* rhs = g.rhs + i * g.k * g.n;
      const View b = g.transpose_rhs ? View{rhs, 1, g.k} : View{rhs, g.n, 1};
      problems.push_back({View{g.lhs + start * g.k, g.k, 1}, b, size, g.k, g.out + start * g.n});
    }
    start += size;
  }
  std::fill(g.out + start * g.n, g.out + g.m * g.n, 0.f);
  run_groups(problems, g.n, g.n);
}

void tgmm(const TgmmArgs& g) {
  // out[i] (k x n) = lhs[rows of i]^T (k x size) * dout[rows of i] (size x n).
  std::vector<GroupProblem> problems;
  int64_t start = 0;
  for (int64_t i = 0; i < g.groups; ++i) {
    const int64_t size = std::min<int64_t>(std::max<int32_t>(g.group_sizes[i], 0), g.m - start);
    problems.push_back({View{g.lhs + start * g.k, 1, g.k}, View{g.dout + start * g.n, g.n, 1}, g.k,
                        size, g.out + i * g.k * g.n});
    start += size;
  }
  run_groups(problems, g.n, g.n);
}

}  // namespace LLMK_ISA
}  // namespace llmk
