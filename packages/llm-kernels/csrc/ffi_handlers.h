// XLA FFI handler symbols defined in ffi_handlers.cc.
#pragma once
#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* LlmkAttentionFwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkAttentionBwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkRmsNormFwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkRmsNormBwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkGmm(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkTgmm(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkInt8Matmul(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkInt4Matmul(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkPackedMatmul(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkPackedMatmulBf16(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkPagedDecodeAttention(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkPagedDecodeAttentionBf16(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LlmkPagedDecodeAttentionI8(XLA_FFI_CallFrame* call_frame);
}
