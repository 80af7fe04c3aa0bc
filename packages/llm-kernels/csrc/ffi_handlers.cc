// XLA FFI handlers: decode buffers and attributes, check shapes, call the kernels.
// Leading dimensions beyond the op's own rank are folded into the batch, which is what
// ffi_call(vmap_method="broadcast_all") produces under jax.vmap.
#include <algorithm>
#include <cstdint>

#include "ffi_handlers.h"
#include "kernels.h"
#include "pool_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace llmk {
namespace {

template <typename Buf>
int64_t lead_product(const Buf& buf, size_t keep) {
  auto dims = buf.dimensions();
  int64_t n = 1;
  for (size_t i = 0; i + keep < dims.size(); ++i) n *= dims[i];
  return n;
}

ffi::Error attn_params(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                       ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::S32>& q_seg,
                       ffi::Buffer<ffi::S32>& k_seg, bool causal, int64_t window, float softcap,
                       float scale, bool has_segments, int64_t block_q, int64_t block_k,
                       AttnParams& p) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() < 4 || kd.size() != qd.size() || vd.size() != qd.size())
    return ffi::Error::InvalidArgument("flash_attention: q, k, v must have the same rank >= 4");
  const size_t r = qd.size();
  p.batch = lead_product(q, 3);
  p.q_len = qd[r - 3];
  p.heads = qd[r - 2];
  p.head_dim = qd[r - 1];
  p.kv_len = kd[r - 3];
  p.kv_heads = kd[r - 2];
  if (lead_product(k, 3) != p.batch || kd[r - 1] != p.head_dim || vd[r - 1] != p.head_dim ||
      vd[r - 2] != p.kv_heads || vd[r - 3] != p.kv_len || lead_product(v, 3) != p.batch)
    return ffi::Error::InvalidArgument("flash_attention: k/v shapes do not match q");
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0)
    return ffi::Error::InvalidArgument("flash_attention: heads not divisible by kv_heads");
  p.causal = causal;
  p.window = window;
  p.softcap = softcap;
  p.scale = scale;
  p.block_q = block_q;
  p.block_k = block_k;
  p.q_seg = p.k_seg = nullptr;
  if (has_segments) {
    if (static_cast<int64_t>(q_seg.element_count()) != p.batch * p.q_len ||
        static_cast<int64_t>(k_seg.element_count()) != p.batch * p.kv_len)
      return ffi::Error::InvalidArgument("flash_attention: segment id shapes do not match");
    p.q_seg = q_seg.typed_data();
    p.k_seg = k_seg.typed_data();
  }
  return ffi::Error::Success();
}

ffi::Error AttentionFwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_seg,
                            ffi::Buffer<ffi::S32> k_seg, bool causal, int64_t window,
                            float softcap, float scale, bool has_segments, int64_t block_q,
                            int64_t block_k, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse) {
  AttnFwdArgs a;
  ffi::Error err = attn_params(q, k, v, q_seg, k_seg, causal, window, softcap, scale,
                               has_segments, block_q, block_k, a.p);
  if (err.failure()) return err;
  if (static_cast<int64_t>(lse->element_count()) != a.p.batch * a.p.heads * a.p.q_len)
    return ffi::Error::InvalidArgument("flash_attention: lse has the wrong size");
  a.q = q.typed_data();
  a.k = k.typed_data();
  a.v = v.typed_data();
  a.out = out->typed_data();
  a.lse = lse->typed_data();
  attention_fwd(a);
  return ffi::Error::Success();
}

ffi::Error AttentionBwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_seg,
                            ffi::Buffer<ffi::S32> k_seg, ffi::Buffer<ffi::F32> dout,
                            ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> delta, bool causal,
                            int64_t window, float softcap, float scale, bool has_segments,
                            int64_t block_q, int64_t block_k, ffi::ResultBuffer<ffi::F32> dq,
                            ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  AttnBwdArgs a;
  ffi::Error err = attn_params(q, k, v, q_seg, k_seg, causal, window, softcap, scale,
                               has_segments, block_q, block_k, a.p);
  if (err.failure()) return err;
  const int64_t rows = a.p.batch * a.p.heads * a.p.q_len;
  if (dout.element_count() != q.element_count() ||
      static_cast<int64_t>(lse.element_count()) != rows ||
      static_cast<int64_t>(delta.element_count()) != rows)
    return ffi::Error::InvalidArgument("flash_attention_bwd: dout/lse/delta shapes do not match");
  a.q = q.typed_data();
  a.k = k.typed_data();
  a.v = v.typed_data();
  a.dout = dout.typed_data();
  a.lse = lse.typed_data();
  a.delta = delta.typed_data();
  a.dq = dq->typed_data();
  a.dk = dk->typed_data();
  a.dv = dv->typed_data();
  attention_bwd(a);
  return ffi::Error::Success();
}

ffi::Error norm_args(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w, float eps,
                     RmsNormArgs& a) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() == 0 || wd.size() == 0 || xd[xd.size() - 1] != wd[wd.size() - 1] ||
      xd[xd.size() - 1] == 0)
    return ffi::Error::InvalidArgument("rms_norm: weight must match the last dim of x");
  a.dim = xd[xd.size() - 1];
  a.rows = x.element_count() / a.dim;
  const int64_t n_w = w.element_count() / a.dim;
  if (n_w == 0 || a.rows % n_w != 0)
    return ffi::Error::InvalidArgument("rms_norm: weight batch does not divide x rows");
  a.rows_per_weight = a.rows / n_w;
  a.eps = eps;
  a.x = x.typed_data();
  a.weight = w.typed_data();
  return ffi::Error::Success();
}

ffi::Error RmsNormFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, float eps,
                          ffi::ResultBuffer<ffi::F32> y) {
  RmsNormArgs a{};
  ffi::Error err = norm_args(x, w, eps, a);
  if (err.failure()) return err;
  a.y = y->typed_data();
  if (a.rows > 0) rms_norm_fwd(a);
  return ffi::Error::Success();
}

ffi::Error RmsNormBwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::Buffer<ffi::F32> dy, float eps, ffi::ResultBuffer<ffi::F32> dx,
                          ffi::ResultBuffer<ffi::F32> dw) {
  RmsNormArgs a{};
  ffi::Error err = norm_args(x, w, eps, a);
  if (err.failure()) return err;
  a.dy = dy.typed_data();
  a.dx = dx->typed_data();
  a.dweight = dw->typed_data();
  rms_norm_bwd(a);
  return ffi::Error::Success();
}

ffi::Error GmmImpl(ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs,
                   ffi::Buffer<ffi::S32> group_sizes, bool transpose_rhs,
                   ffi::ResultBuffer<ffi::F32> out) {
  auto ld = lhs.dimensions(), rd = rhs.dimensions(), od = out->dimensions();
  if (ld.size() != 2 || rd.size() != 3 || od.size() != 2)
    return ffi::Error::InvalidArgument("grouped_matmul: lhs must be 2-D, rhs 3-D");
  GmmArgs a{};
  a.m = ld[0];
  a.k = ld[1];
  a.groups = rd[0];
  a.n = transpose_rhs ? rd[1] : rd[2];
  if ((transpose_rhs ? rd[2] : rd[1]) != a.k || od[0] != a.m || od[1] != a.n ||
      static_cast<int64_t>(group_sizes.element_count()) != a.groups)
    return ffi::Error::InvalidArgument("grouped_matmul: shapes do not match");
  a.group_sizes = group_sizes.typed_data();
  a.lhs = lhs.typed_data();
  a.rhs = rhs.typed_data();
  a.transpose_rhs = transpose_rhs;
  a.out = out->typed_data();
  gmm(a);
  return ffi::Error::Success();
}

ffi::Error TgmmImpl(ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> dout,
                    ffi::Buffer<ffi::S32> group_sizes, ffi::ResultBuffer<ffi::F32> out) {
  auto ld = lhs.dimensions(), dd = dout.dimensions(), od = out->dimensions();
  if (ld.size() != 2 || dd.size() != 2 || od.size() != 3 || dd[0] != ld[0] || od[1] != ld[1] ||
      od[2] != dd[1] || static_cast<int64_t>(group_sizes.element_count()) != od[0])
    return ffi::Error::InvalidArgument("grouped_matmul (rhs gradient): shapes do not match");
  TgmmArgs a{};
  a.m = ld[0];
  a.k = ld[1];
  a.n = dd[1];
  a.groups = od[0];
  a.group_sizes = group_sizes.typed_data();
  a.lhs = lhs.typed_data();
  a.dout = dout.typed_data();
  a.out = out->typed_data();
  tgmm(a);
  return ffi::Error::Success();
}

ffi::Error Int8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || qd.size() != 2 || yd.size() != 2 || xd[1] != qd[0] ||
      static_cast<int64_t>(scale.element_count()) != qd[1] || yd[0] != xd[0] || yd[1] != qd[1])
    return ffi::Error::InvalidArgument("int8_matmul: expected x [m, k], q [k, n], scale [n]");
  Int8MatmulArgs a{};
  a.m = xd[0];
  a.k = xd[1];
  a.n = qd[1];
  a.x = x.typed_data();
  a.q = q.typed_data();
  a.scale = scale.typed_data();
  a.y = y->typed_data();
  if (a.m > 0 && a.n > 0) int8_matmul(a);
  return ffi::Error::Success();
}

ffi::Error Int4MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  const bool shapes_ok = xd.size() == 2 && qd.size() == 2 && sd.size() == 2 && yd.size() == 2 &&
                         xd[1] == 2 * qd[0] && sd[1] == qd[1] && sd[0] > 0 &&
                         xd[1] % sd[0] == 0 && (xd[1] / sd[0]) % 2 == 0 && yd[0] == xd[0] &&
                         yd[1] == qd[1];
  if (!shapes_ok)
    return ffi::Error::InvalidArgument(
        "int4_matmul: expected x [m, k], q [k / 2, n], scale [groups, n] with an even group size");
  Int4MatmulArgs a{};
  a.m = xd[0];
  a.k = xd[1];
  a.n = qd[1];
  a.group = xd[1] / sd[0];
  a.x = x.typed_data();
  a.q = q.typed_data();
  a.scale = scale.typed_data();
  a.y = y->typed_data();
  if (a.m > 0 && a.n > 0) int4_matmul(a);
  return ffi::Error::Success();
}

// The panels are cut into chunks of a few panels, shared over XLA's pool (pool_for.h).
template <ffi::DataType T>
ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const bool ok = xd.size() == 2 && wd.size() == 3 && yd.size() == 2 && wd[1] == xd[1] &&
                  wd[2] == kPackedPanel && yd[0] == xd[0] &&
                  wd[0] == (yd[1] + kPackedPanel - 1) / kPackedPanel;
  if (!ok)
    return ffi::Error::InvalidArgument(
        "packed_matmul: expected x [m, k], w [ceil(n / 32), k, 32], y [m, n]");
  PackedMatmulArgs a{};
  a.m = xd[0];
  a.k = xd[1];
  a.n = yd[1];
  a.x = x.typed_data();
  if constexpr (T == ffi::DataType::BF16)
    a.w_bf16 = w.typed_data();
  else
    a.w = w.typed_data();
  a.y = y->typed_data();
  if (a.m == 0 || a.n == 0) return ffi::Error::Success();
  const int64_t panels = wd[0];
  const bool small = a.m * a.k * a.n < (int64_t{1} << 16);
  const int64_t workers = small ? 1 : std::max<int64_t>(pool.num_threads(), 1);
  const int64_t chunk = std::max<int64_t>(1, panels / (4 * std::min(workers, panels)));
  pool_for(pool, (panels + chunk - 1) / chunk, workers, [a, chunk, panels](int64_t c) {
    PackedMatmulArgs part = a;
    part.p0 = c * chunk;
    part.p1 = std::min(part.p0 + chunk, panels);
    packed_matmul(part);
  });
  return ffi::Error::Success();
}

// q [B, H, D]; k, v paged pools [K, P, ps, D] with table [B, n], or contiguous [B, K, L, D]
// (float32 or bfloat16 caches).
template <ffi::DataType T>
ffi::Error PagedDecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                    ffi::Buffer<T> k, ffi::Buffer<T> v,
                                    ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> table,
                                    ffi::Buffer<ffi::F32> sinks, ffi::Buffer<ffi::F32> k_scale,
                                    ffi::Buffer<ffi::F32> v_scale, bool contiguous, int64_t window,
                                    float softcap, float scale, bool has_sinks,
                                    ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = table.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument(
        "paged_decode_attention: expected q [B, H, D], 4-d k and v, table [B, n]");
  for (size_t i = 0; i < 4; ++i)
    if (kd[i] != vd[i])
      return ffi::Error::InvalidArgument("paged_decode_attention: k and v shapes differ");
  PagedDecodeArgs a{};
  a.batch = qd[0];
  a.heads = qd[1];
  a.head_dim = qd[2];
  if (contiguous) {  // [B, K, L, D]: row b is page b of size L
    a.kv_heads = kd[1];
    a.page_size = kd[2];
    a.pages_per_row = 1;
    a.num_pages = kd[0];
    a.kv_head_stride = kd[2] * kd[3];
    a.page_stride = kd[1] * kd[2] * kd[3];
    if (kd[0] != a.batch)
      return ffi::Error::InvalidArgument("paged_decode_attention: cache batch != q batch");
  } else {  // [K, P, ps, D]
    a.kv_heads = kd[0];
    a.page_size = kd[2];
    a.pages_per_row = td[1];
    a.num_pages = kd[1];
    a.kv_head_stride = kd[1] * kd[2] * kd[3];
    a.page_stride = kd[2] * kd[3];
    if (td[0] != a.batch)
      return ffi::Error::InvalidArgument("paged_decode_attention: table rows != q batch");
  }
  if (kd[3] != a.head_dim || a.kv_heads <= 0 || a.heads % a.kv_heads != 0 ||
      static_cast<int64_t>(lengths.element_count()) != a.batch ||
      (has_sinks && static_cast<int64_t>(sinks.element_count()) != a.heads))
    return ffi::Error::InvalidArgument(
        "paged_decode_attention: head_dim, heads / kv_heads, lengths [B] or sinks [H] mismatch");
  a.q = q.typed_data();
  a.k = k.typed_data();
  a.v = v.typed_data();
  a.cache_type = T == ffi::DataType::BF16 ? PagedDecodeArgs::kBF16
                 : T == ffi::DataType::S8 ? PagedDecodeArgs::kI8
                                          : PagedDecodeArgs::kF32;
  if (a.cache_type == PagedDecodeArgs::kI8) {
    const int64_t per_scale = static_cast<int64_t>(k.element_count()) / a.head_dim;
    if (static_cast<int64_t>(k_scale.element_count()) != per_scale ||
        static_cast<int64_t>(v_scale.element_count()) != per_scale)
      return ffi::Error::InvalidArgument(
          "paged_decode_attention: int8 k / v need k_scale / v_scale of their shape, head_dim 1");
    a.k_scale = k_scale.typed_data();
    a.v_scale = v_scale.typed_data();
  }
  a.lengths = lengths.typed_data();
  a.table = contiguous ? nullptr : table.typed_data();
  a.sinks = has_sinks ? sinks.typed_data() : nullptr;
  a.window = window;
  a.softcap = softcap;
  a.scale = scale;
  a.out = out->typed_data();
  const int64_t tasks = a.batch * a.kv_heads;
  pool_for(pool, tasks, std::max<int64_t>(pool.num_threads(), 1), [a](int64_t t) {
    PagedDecodeArgs part = a;
    part.t0 = t;
    part.t1 = t + 1;
    paged_decode_attention(part);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace llmk

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmkGmm, llmk::GmmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("transpose_rhs")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmkTgmm, llmk::TgmmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmkAttentionFwd, llmk::AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap")
                                  .Attr<float>("scale")
                                  .Attr<bool>("has_segments")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmkAttentionBwd, llmk::AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap")
                                  .Attr<float>("scale")
                                  .Attr<bool>("has_segments")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmkRmsNormFwd, llmk::RmsNormFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmkRmsNormBwd, llmk::RmsNormBwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmkInt8Matmul, llmk::Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmkInt4Matmul, llmk::Int4MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmkPackedMatmul, llmk::PackedMatmulImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmkPackedMatmulBf16, llmk::PackedMatmulImpl<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// One binding per cache dtype (float32, bfloat16, int8); the scale buffers are read for int8 only.
#define LLMK_PAGED_DECODE_HANDLER(symbol, dtype)                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, llmk::PagedDecodeAttentionImpl<ffi::DataType::dtype>, \
                                ffi::Ffi::Bind()                                            \
                                    .Ctx<ffi::ThreadPool>()                                 \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::dtype>>()                         \
                                    .Arg<ffi::Buffer<ffi::dtype>>()                         \
                                    .Arg<ffi::Buffer<ffi::S32>>()                           \
                                    .Arg<ffi::Buffer<ffi::S32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Attr<bool>("contiguous")                               \
                                    .Attr<int64_t>("window")                                \
                                    .Attr<float>("softcap")                                 \
                                    .Attr<float>("scale")                                   \
                                    .Attr<bool>("has_sinks")                                \
                                    .Ret<ffi::Buffer<ffi::F32>>())

LLMK_PAGED_DECODE_HANDLER(LlmkPagedDecodeAttention, F32);
LLMK_PAGED_DECODE_HANDLER(LlmkPagedDecodeAttentionBf16, BF16);
LLMK_PAGED_DECODE_HANDLER(LlmkPagedDecodeAttentionI8, S8);
