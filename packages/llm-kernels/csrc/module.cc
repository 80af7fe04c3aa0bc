// nanobind module: exposes the FFI handlers as capsules for jax.ffi.register_ffi_target.
#include <nanobind/nanobind.h>

#include "ffi_handlers.h"
#include "kernels.h"
#include "parallel.h"
#include "scratch.h"

namespace nb = nanobind;

namespace {
template <typename T>
nb::capsule encapsulate(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}
}  // namespace

NB_MODULE(_cpu_kernels, m) {
  m.doc() = "CPU XLA FFI kernels of llm_kernels (flash attention, RMSNorm, grouped matmul, int8 / int4 / packed matmul, paged decode attention).";
  m.def("registrations", []() {
    nb::dict d;
    d["llm_kernels_attention_fwd"] = encapsulate(LlmkAttentionFwd);
    d["llm_kernels_attention_bwd"] = encapsulate(LlmkAttentionBwd);
    d["llm_kernels_rms_norm_fwd"] = encapsulate(LlmkRmsNormFwd);
    d["llm_kernels_rms_norm_bwd"] = encapsulate(LlmkRmsNormBwd);
    d["llm_kernels_gmm"] = encapsulate(LlmkGmm);
    d["llm_kernels_tgmm"] = encapsulate(LlmkTgmm);
    d["llm_kernels_int8_matmul"] = encapsulate(LlmkInt8Matmul);
    d["llm_kernels_int4_matmul"] = encapsulate(LlmkInt4Matmul);
    d["llm_kernels_packed_matmul"] = encapsulate(LlmkPackedMatmul);
    d["llm_kernels_packed_matmul_bf16"] = encapsulate(LlmkPackedMatmulBf16);
    d["llm_kernels_paged_decode_attention"] = encapsulate(LlmkPagedDecodeAttention);
    d["llm_kernels_paged_decode_attention_bf16"] = encapsulate(LlmkPagedDecodeAttentionBf16);
    d["llm_kernels_paged_decode_attention_int8"] = encapsulate(LlmkPagedDecodeAttentionI8);
    return d;
  });
  m.def("isa", []() { return llmk::isa_name(); }, "The SIMD build picked at runtime.");
  m.def("num_threads", []() { return llmk::num_threads(); });
  m.def("scratch_peak_bytes", []() { return llmk::ScratchStats::peak().load(); },
        "Peak bytes of kernel scratch since the last reset (all kernels, all threads).");
  m.def("reset_scratch_peak", []() {
    llmk::ScratchStats::peak().store(llmk::ScratchStats::current().load());
  });
}
