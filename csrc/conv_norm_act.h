// Switchable conv block: conv -> per-channel (scale, bias) epilogue -> activation -> + residual.
//
// The two BatchNorm sets of a skip-aware norm fold into two (scale, bias) pairs over one shared
// convolution weight; the caller passes the pair for the depth being run. The ops declared here
// are the compiled backends behind the public Python op `torch.ops.anydepth.conv_norm_act`; they
// are registered as `torch.ops.anydepth._ext_*` and assume the Python side validated their inputs
// (they still TORCH_CHECK what would otherwise read out of bounds).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace anydepth {

// Activation codes: the index in anydepth_kernels.reference.ACTIVATIONS.
enum Activation : int64_t { kIdentity = 0, kRelu = 1, kSilu = 2 };

// Memory format the epilogue runs in: channels-last when `y` is stored that way, else NCHW.
inline at::MemoryFormat epilogue_format(const at::Tensor& y) {
  if (y.dim() == 4 && !y.is_contiguous() && y.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// Checks of the epilogue operands against the output `y` (what would otherwise read out of bounds).
inline void check_epilogue_args(const at::Tensor& y, const at::Tensor& scale,
                                const at::Tensor& bias, int64_t act,
                                const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(y.dim() == 4, "anydepth: expected a 4-D [N, C, H, W] tensor, got ", y.dim(), "-D");
  const int64_t C = y.size(1);
  TORCH_CHECK(scale.dim() == 1 && scale.numel() == C && bias.dim() == 1 && bias.numel() == C,
              "anydepth: scale and bias must be 1-D with ", C, " elements, got ", scale.sizes(),
              " and ", bias.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "anydepth: scale and bias must be float32");
  TORCH_CHECK(scale.device() == y.device() && bias.device() == y.device(),
              "anydepth: scale and bias must be on ", y.device());
  TORCH_CHECK(act >= kIdentity && act <= kSilu, "anydepth: unknown activation code ", act);
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == y.sizes(), "anydepth: residual shape ", residual->sizes(),
                " does not match the output shape ", y.sizes());
    TORCH_CHECK(residual->scalar_type() == y.scalar_type() && residual->device() == y.device(),
                "anydepth: residual must have the output's dtype and device");
  }
}

}  // namespace anydepth
