// Multi-scale deformable attention: argument checks shared by the CPU and CUDA kernels.
//
// Layout (Deformable-DETR convention, all contiguous):
//   value               [N, S, M, D]        S = sum_l H_l * W_l
//   spatial_shapes      [L, 2]   int64      (H_l, W_l)
//   level_start_index   [L]      int64      offset of level l in S
//   sampling_locations  [N, Q, M, L, P, 2]  (x, y), normalised to [0, 1]
//   attention_weights   [N, Q, M, L, P]
//   output              [N, Q, M * D]
//
// Bilinear sampling with zero padding, exactly grid_sample(align_corners=False,
// padding_mode="zeros"): pixel coordinate x = loc_x * W - 0.5, each of the four corners that
// lies outside the map contributes 0. The Python layer (anydepth_kernels/ops/ms_deform_attn.py)
// validates the level table against S (a CPU table on every call, a device table once per
// tensor version, nothing while a CUDA graph captures); these checks guard the kernels' own
// assumptions, and the CPU and CUDA kernels also bound every level by S themselves (the points
// of a level that does not fit give NaN and read nothing).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace anydepth {

struct MsDeformDims {
  int64_t N, S, M, D, L, Q, P;
};

inline MsDeformDims check_ms_deform_args(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                         const at::Tensor& level_start_index,
                                         const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 &&
                  spatial_shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be an int64 [L, 2] tensor");
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be an int64 [L] tensor");
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  TORCH_CHECK(loc.dim() == 6 && loc.size(0) == N && loc.size(2) == M && loc.size(3) == L &&
                  loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [N, Q, M, L, P, 2], got ", loc.sizes());
  const int64_t Q = loc.size(1), P = loc.size(4);
  TORCH_CHECK(attn.dim() == 5 && attn.size(0) == N && attn.size(1) == Q && attn.size(2) == M &&
                  attn.size(3) == L && attn.size(4) == P,
              "ms_deform_attn: attention_weights must be [N, Q, M, L, P], got ", attn.sizes());
  TORCH_CHECK(loc.scalar_type() == value.scalar_type() && attn.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a dtype");
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &loc, &attn}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all tensors must be on ",
                value.device(), ", got one on ", t->device());
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn: the kernels take contiguous tensors");
  }
  return {N, S, M, D, L, Q, P};
}

}  // namespace anydepth
