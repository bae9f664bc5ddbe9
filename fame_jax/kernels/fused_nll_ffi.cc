// XLA FFI handler around fame_fused_nll (fused_nll.c): XLA calls the kernel on its own
// buffers, with no host callback and no copies (fame_jax/cpu_kernels.py registers it).
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" int fame_fused_nll(int K, int R, int V, const float* U, const float* logw,
                              const int* tgt, const float* T, double* loss, float* dU,
                              float* dT, float* dlogw);

static ffi::Error FusedNll(ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> log_weights,
                           ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> tables,
                           ffi::ResultBuffer<ffi::F32> loss, ffi::ResultBuffer<ffi::F32> du,
                           ffi::ResultBuffer<ffi::F32> d_tables,
                           ffi::ResultBuffer<ffi::F32> d_log_weights) {
  auto dims = u.dimensions();  // [K, R, 32]
  if (dims.size() != 3 || tables.dimensions().size() != 3) {
    return ffi::Error::InvalidArgument("fame_fused_nll: u [K, R, 32], tables [K, V, 32]");
  }
  double total = 0;
  int error = fame_fused_nll(static_cast<int>(dims[0]), static_cast<int>(dims[1]),
                             static_cast<int>(tables.dimensions()[1]), u.typed_data(),
                             log_weights.typed_data(), targets.typed_data(),
                             tables.typed_data(), &total, du->typed_data(),
                             d_tables->typed_data(), d_log_weights->typed_data());
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
