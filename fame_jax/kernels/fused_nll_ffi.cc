// XLA FFI handler around fame_fused_nll (fused_nll.c): XLA calls the kernel on its own
// buffers, with no host callback and no copies (fame_jax/cpu_kernels.py registers it).
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" int fame_fused_nll(int K, int G, int R, int V, int d, int rows, const float* U,
                              const float* logw, const int* tgt, const float* emb,
                              const float* W, double* loss, float* dU, float* demb, float* dW,
                              float* dlogw);

static ffi::Error FusedNll(ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> log_weights,
                           ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> embedding,
                           ffi::Buffer<ffi::F32> projection, int64_t num_items,
                           int64_t groups,
                           ffi::ResultBuffer<ffi::F32> loss, ffi::ResultBuffer<ffi::F32> du,
                           ffi::ResultBuffer<ffi::F32> d_embedding,
                           ffi::ResultBuffer<ffi::F32> d_projection,
                           ffi::ResultBuffer<ffi::F32> d_log_weights) {
  auto dims = u.dimensions();  // [K, R, 32]
  auto table = embedding.dimensions();  // [rows, d]
  if (dims.size() != 3 || table.size() != 2 || projection.dimensions().size() != 3) {
    return ffi::Error::InvalidArgument(
        "fame_fused_nll: u [K, R, 32], embedding [rows, d], projection [K, d, 32]");
  }
  double total = 0;
  int error = fame_fused_nll(
      static_cast<int>(dims[0]), static_cast<int>(groups), static_cast<int>(dims[1]),
      static_cast<int>(num_items), static_cast<int>(table[1]), static_cast<int>(table[0]),
      u.typed_data(), log_weights.typed_data(), targets.typed_data(), embedding.typed_data(),
      projection.typed_data(), &total, du->typed_data(), d_embedding->typed_data(),
      d_projection->typed_data(), d_log_weights->typed_data());
  if (error) {
    return ffi::Error::Internal(
        "fame_fused_nll failed (a bad shape, a target outside the catalogue, or no memory)");
  }
  loss->typed_data()[0] = static_cast<float>(total);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FameFusedNll, FusedNll,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_items")
                                  .Attr<int64_t>("groups")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
