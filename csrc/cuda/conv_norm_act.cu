// CUDA backend of the switchable conv block: cuDNN convolution (at::convolution) followed by one
// fused epilogue kernel (scale, bias, activation, residual) run in place over its output on the
// current stream (a grid-stride loop, fp32 arithmetic for half/bf16, 32-bit index math unless the
// tensor has 2^31 elements or more).
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../conv_norm_act.h"

namespace anydepth {
namespace {

template <int64_t ACT, typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t z) {
  if constexpr (ACT == kRelu) {
    return z > acc_t(0) ? z : acc_t(0);
  } else if constexpr (ACT == kSilu) {
    return z / (acc_t(1) + exp(-z));
  } else {
    return z;
  }
}

// Elementwise epilogue. The channel of flat index i is (i / HW) % C for NCHW and i % C for
// channels-last (CHANNELS_LAST drops the division by HW). index_t is the type of the index
// arithmetic: uint32_t whenever numel fits in 31 bits (the launcher picks it; then i < numel <
// 2^31 and the grid stride is < 2^27, so i + stride never wraps), int64_t otherwise. 64-bit
// division and modulo are emulated in software on NVIDIA GPUs (dozens of instructions), 32-bit
// ones are a few: the 32-bit path keeps the per-element index math off the critical path.
template <int64_t ACT, bool RES, bool CHANNELS_LAST, typename index_t, typename T>
__global__ void epilogue_kernel(T* out, const T* in, const float* __restrict__ scale,
                                const float* __restrict__ bias, const T* res, index_t numel,
                                index_t C, index_t inner) {
  using acc_t = at::opmath_type<T>;
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const index_t c = CHANNELS_LAST ? i % C : (i / inner) % C;
    acc_t a = activate<ACT, acc_t>(static_cast<acc_t>(in[i]) * scale[c] + bias[c]);
    if constexpr (RES) a += static_cast<acc_t>(res[i]);
    out[i] = static_cast<T>(a);
  }
}

template <int64_t ACT, bool CHANNELS_LAST, typename index_t, typename T>
void launch_indexed(T* o, const T* i, const float* s, const float* b, const T* r, int64_t numel,
                    int64_t C, int64_t inner, int blocks, int threads, cudaStream_t stream) {
  const index_t n = static_cast<index_t>(numel), c = static_cast<index_t>(C),
                hw = static_cast<index_t>(inner);
  if (r != nullptr) {
    epilogue_kernel<ACT, true, CHANNELS_LAST, index_t>
        <<<blocks, threads, 0, stream>>>(o, i, s, b, r, n, c, hw);
  } else {
    epilogue_kernel<ACT, false, CHANNELS_LAST, index_t>
        <<<blocks, threads, 0, stream>>>(o, i, s, b, r, n, c, hw);
  }
}

template <int64_t ACT, typename T>
void launch(T* o, const T* i, const float* s, const float* b, const T* r, int64_t numel, int64_t C,
            int64_t inner, bool channels_last, cudaStream_t stream) {
  const int threads = 256;
  const int64_t max_blocks = 65535LL * 8;
  const int blocks = static_cast<int>(std::min<int64_t>((numel + threads - 1) / threads, max_blocks));
  // numel <= INT32_MAX: every index below numel, C and HW fit in 31 bits, and with the grid
  // stride (<= 65535 * 8 * 256 < 2^27) added the loop index stays below 2^32 (unsigned: no wrap).
  const bool index32 = numel <= static_cast<int64_t>(std::numeric_limits<int32_t>::max());
  if (index32) {
    if (channels_last) {
      launch_indexed<ACT, true, uint32_t>(o, i, s, b, r, numel, C, inner, blocks, threads, stream);
    } else {
      launch_indexed<ACT, false, uint32_t>(o, i, s, b, r, numel, C, inner, blocks, threads, stream);
    }
  } else {
    if (channels_last) {
      launch_indexed<ACT, true, int64_t>(o, i, s, b, r, numel, C, inner, blocks, threads, stream);
    } else {
      launch_indexed<ACT, false, int64_t>(o, i, s, b, r, numel, C, inner, blocks, threads, stream);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out may alias y (in-place epilogue over a fresh convolution output).
void epilogue_into(at::Tensor& out, const at::Tensor& y, const at::Tensor& scale,
                   const at::Tensor& bias, int64_t act, const std::optional<at::Tensor>& residual) {
  const auto fmt = epilogue_format(y);
  at::Tensor res;
  if (residual.has_value()) res = residual->contiguous(fmt);
  const int64_t numel = y.numel();
  if (numel == 0) return;
  const int64_t C = y.size(1);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t inner = channels_last ? 1 : y.size(2) * y.size(3);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "anydepth_epilogue_cuda", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* i = y.const_data_ptr<scalar_t>();
    const scalar_t* r = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    const float* s = scale.data_ptr<float>();
    const float* b = bias.data_ptr<float>();
    switch (act) {
      case kRelu: launch<kRelu>(o, i, s, b, r, numel, C, inner, channels_last, stream); break;
      case kSilu: launch<kSilu>(o, i, s, b, r, numel, C, inner, channels_last, stream); break;
      default: launch<kIdentity>(o, i, s, b, r, numel, C, inner, channels_last, stream); break;
    }
  });
}

at::Tensor scale_bias_act_cuda(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias,
                               int64_t act, const std::optional<at::Tensor>& residual) {
  check_epilogue_args(y, scale, bias, act, residual);
  c10::cuda::CUDAGuard guard(y.device());
  const auto fmt = epilogue_format(y);
  const at::Tensor yc = y.contiguous(fmt);
  at::Tensor out = at::empty_like(yc, yc.options(), fmt);
  epilogue_into(out, yc, scale.contiguous(), bias.contiguous(), act, residual);
  return out;
}

at::Tensor conv_norm_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                              const at::Tensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, int64_t act,
                              const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::convolution(x, weight, std::nullopt, stride, padding, dilation,
                                 /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
  check_epilogue_args(y, scale, bias, act, residual);
  y = y.contiguous(epilogue_format(y));
  epilogue_into(y, y, scale.contiguous(), bias.contiguous(), act, residual);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(anydepth, CUDA, m) {
  m.impl("_ext_scale_bias_act", &scale_bias_act_cuda);
  m.impl("_ext_conv_norm_act", &conv_norm_act_cuda);
}

}  // namespace anydepth
