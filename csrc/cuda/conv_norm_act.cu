// CUDA backend of the switchable conv block: cuDNN convolution (at::convolution) followed by one
// fused epilogue kernel (scale, bias, activation, residual) run in place over its output on the
// current stream (a grid-stride loop, fp32 arithmetic for half/bf16).
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

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

// Elementwise epilogue. The channel of flat index i is (i / HW) % C for NCHW, i % C for
// channels-last (HW passed as 1 there, so one formula serves both).
template <int64_t ACT, bool RES, typename T>
__global__ void epilogue_kernel(T* out, const T* in, const float* __restrict__ scale,
                                const float* __restrict__ bias, const T* res, int64_t numel,
                                int64_t C, int64_t inner) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const int64_t c = (i / inner) % C;
    acc_t a = activate<ACT, acc_t>(static_cast<acc_t>(in[i]) * scale[c] + bias[c]);
    if constexpr (RES) a += static_cast<acc_t>(res[i]);
    out[i] = static_cast<T>(a);
  }
}

template <int64_t ACT, typename T>
void launch(T* o, const T* i, const float* s, const float* b, const T* r, int64_t numel, int64_t C,
            int64_t inner, cudaStream_t stream) {
  const int threads = 256;
  const int64_t max_blocks = 65535LL * 8;
  const int blocks = static_cast<int>(std::min<int64_t>((numel + threads - 1) / threads, max_blocks));
  if (r != nullptr) {
    epilogue_kernel<ACT, true><<<blocks, threads, 0, stream>>>(o, i, s, b, r, numel, C, inner);
  } else {
    epilogue_kernel<ACT, false><<<blocks, threads, 0, stream>>>(o, i, s, b, r, numel, C, inner);
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
  const int64_t inner = fmt == at::MemoryFormat::ChannelsLast ? 1 : y.size(2) * y.size(3);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "anydepth_epilogue_cuda", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* i = y.const_data_ptr<scalar_t>();
    const scalar_t* r = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    const float* s = scale.data_ptr<float>();
    const float* b = bias.data_ptr<float>();
    switch (act) {
      case kRelu: launch<kRelu>(o, i, s, b, r, numel, C, inner, stream); break;
      case kSilu: launch<kSilu>(o, i, s, b, r, numel, C, inner, stream); break;
      default: launch<kIdentity>(o, i, s, b, r, numel, C, inner, stream); break;
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
