// CUDA backend of multi-scale deformable attention (forward and backward); see
// ../ms_deform_attn.h for the layout and the sampling convention. float32, float16, bfloat16 and
// float64, all arithmetic in at::opmath_type (fp32 for the 16-bit types).
//
// Forward: one thread per output element (n, q, m, d), looping over the L * P sampling points;
// consecutive threads hold consecutive channels, so the corner rows of value are read coalesced
// and the location/weight loads are broadcasts.
//
// Backward: one warp per sampling point (n, q, m, l, p); the lanes stride over the D channels,
// reduce the four corner dot products <grad_out, value_corner> with warp shuffles, and
// atomicAdd a * w_corner * grad_out into an fp32 (fp64 for float64) grad_value buffer, cast to
// value's dtype at the end. Lane 0 writes grad_attention_weights and grad_sampling_locations.
//
// Non-finite inputs follow the reference (grid_sample): a non-finite sampling location samples
// NaN, the attention weight multiplies the sample (inf * 0 = NaN).
//
// The level table lives on the device and is read only by the kernels (reading it on the host
// would synchronise). The Python layer validates each table once (and skips that while a CUDA
// graph is being captured), so the kernels bound it themselves: every point of a level that is
// empty or does not lie inside [0, S) is treated as a non-finite location (NaN output and
// gradients, nothing read or written). No table can make them read or write outside value.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../ms_deform_attn.h"

namespace anydepth {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

inline int blocks_for(int64_t work, int64_t per_block) {
  const int64_t max_blocks = 65535LL * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, max_blocks)));
}

template <typename acc_t>
__device__ __forceinline__ bool finite(acc_t v) {
  return isfinite(v);
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);
}

// Level l of the table is non-empty and lies inside [0, S) (overflow-free: H * W <= S - start is
// tested as H <= (S - start) / W).
__device__ __forceinline__ bool level_fits(int64_t H, int64_t W, int64_t start, int64_t S) {
  return H > 0 && W > 0 && start >= 0 && start <= S && H <= (S - start) / W;
}

// Bilinear geometry of one point: rows (-1 when outside the map) and weights of the corners
// (x0, y0), (x1, y0), (x0, y1), (x1, y1). (x, y) is finite and inside [-1, W) x [-1, H)
// (at x = -1 the corner x = 0 has weight 0 but, as in grid_sample, a gradient).
template <typename acc_t>
struct Corners {
  int64_t row[4];
  acc_t w[4];
  acc_t fx, fy;
};

template <typename acc_t>
__device__ __forceinline__ Corners<acc_t> corners(acc_t x, acc_t y, int64_t H, int64_t W,
                                                  int64_t start) {
  Corners<acc_t> c;
  const acc_t xf = floor(x), yf = floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  c.fx = x - xf;
  c.fy = y - yf;
  const acc_t gx = acc_t(1) - c.fx, gy = acc_t(1) - c.fy;
  c.w[0] = gx * gy;
  c.w[1] = c.fx * gy;
  c.w[2] = gx * c.fy;
  c.w[3] = c.fx * c.fy;
  const bool in_x0 = x0 >= 0, in_x1 = x1 < W, in_y0 = y0 >= 0, in_y1 = y1 < H;
  c.row[0] = in_x0 && in_y0 ? start + y0 * W + x0 : -1;
  c.row[1] = in_x1 && in_y0 ? start + y0 * W + x1 : -1;
  c.row[2] = in_x0 && in_y1 ? start + y1 * W + x0 : -1;
  c.row[3] = in_x1 && in_y1 ? start + y1 * W + x1 : -1;
  return c;
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                               scalar_t* __restrict__ out, int64_t total, int64_t S, int64_t M,
                               int64_t D, int64_t L, int64_t Q, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t d = i % D;
    const int64_t nqm = i / D;  // (n * Q + q) * M + m
    const int64_t m = nqm % M;
    const int64_t n = nqm / M / Q;
    const scalar_t* vbase = value + n * S * M * D + m * D + d;
    acc_t acc = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
      const bool fits = level_fits(H, W, start, S);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t pi = (nqm * L + l) * P + p;
        const acc_t a = static_cast<acc_t>(attn[pi]);
        const acc_t x = static_cast<acc_t>(loc[2 * pi]) * static_cast<acc_t>(W) - acc_t(0.5);
        const acc_t y = static_cast<acc_t>(loc[2 * pi + 1]) * static_cast<acc_t>(H) - acc_t(0.5);
        if (!(fits && finite(x) && finite(y))) {
          acc += quiet_nan<acc_t>();
          continue;
        }
        acc_t s = 0;
        if (x >= acc_t(-1) && y >= acc_t(-1) && x < static_cast<acc_t>(W) && y < static_cast<acc_t>(H)) {
          const Corners<acc_t> c = corners(x, y, H, W, start);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (c.row[k] >= 0) s += c.w[k] * static_cast<acc_t>(vbase[c.row[k] * M * D]);
          }
        }
        acc += a * s;
      }
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ loc,
                                const scalar_t* __restrict__ attn,
                                const scalar_t* __restrict__ grad_out,
                                at::opmath_type<scalar_t>* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_loc, scalar_t* __restrict__ grad_attn,
                                int64_t points, int64_t S, int64_t M, int64_t D, int64_t L,
                                int64_t Q, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t stride = warps_per_block * gridDim.x;
  // The loop bound is uniform across the warp, so every lane takes part in the shuffles.
  for (int64_t pi = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarp;
       pi < points; pi += stride) {
    const int64_t lp = pi % (L * P);
    const int64_t l = lp / P;
    const int64_t nqm = pi / (L * P);
    const int64_t m = nqm % M;
    const int64_t n = nqm / M / Q;
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
    const acc_t a = static_cast<acc_t>(attn[pi]);
    const acc_t x = static_cast<acc_t>(loc[2 * pi]) * static_cast<acc_t>(W) - acc_t(0.5);
    const acc_t y = static_cast<acc_t>(loc[2 * pi + 1]) * static_cast<acc_t>(H) - acc_t(0.5);
    if (!(level_fits(H, W, start, S) && finite(x) && finite(y))) {
      if (lane == 0) {
        grad_attn[pi] = static_cast<scalar_t>(quiet_nan<acc_t>());
        grad_loc[2 * pi] = static_cast<scalar_t>(quiet_nan<acc_t>());
        grad_loc[2 * pi + 1] = static_cast<scalar_t>(quiet_nan<acc_t>());
      }
      continue;
    }
    if (!(x >= acc_t(-1) && y >= acc_t(-1) && x < static_cast<acc_t>(W) && y < static_cast<acc_t>(H))) {
      if (lane == 0) {
        grad_attn[pi] = scalar_t(0);
        grad_loc[2 * pi] = scalar_t(0);
        grad_loc[2 * pi + 1] = scalar_t(0);
      }
      continue;
    }
    const Corners<acc_t> c = corners(x, y, H, W, start);
    const int64_t base = n * S * M * D + m * D;  // value[n, 0, m, 0]
    const scalar_t* g = grad_out + nqm * D;
    acc_t dot[4] = {0, 0, 0, 0};
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t gd = static_cast<acc_t>(g[d]);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (c.row[k] >= 0) {
          const int64_t off = base + c.row[k] * M * D + d;
          dot[k] += gd * static_cast<acc_t>(value[off]);
          atomicAdd(grad_value + off, a * c.w[k] * gd);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) dot[k] = warp_sum(dot[k]);
    if (lane == 0) {
      const acc_t gx = acc_t(1) - c.fx, gy = acc_t(1) - c.fy;
      grad_attn[pi] = static_cast<scalar_t>(c.w[0] * dot[0] + c.w[1] * dot[1] + c.w[2] * dot[2] +
                                            c.w[3] * dot[3]);
      grad_loc[2 * pi] = static_cast<scalar_t>(
          a * static_cast<acc_t>(W) * (gy * (dot[1] - dot[0]) + c.fy * (dot[3] - dot[2])));
      grad_loc[2 * pi + 1] = static_cast<scalar_t>(
          a * static_cast<acc_t>(H) * (gx * (dot[2] - dot[0]) + c.fx * (dot[3] - dot[1])));
    }
  }
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const MsDeformDims k = check_ms_deform_args(value, spatial_shapes, level_start_index,
                                              sampling_locations, attention_weights);
  c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({k.N, k.Q, k.M * k.D}, value.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "anydepth_ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(
        value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
        level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
        attention_weights.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, k.S,
        k.M, k.D, k.L, k.Q, k.P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const MsDeformDims k = check_ms_deform_args(value, spatial_shapes, level_start_index,
                                              sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == k.N && grad_output.size(1) == k.Q &&
                  grad_output.size(2) == k.M * k.D,
              "ms_deform_attn backward: grad_output must be [N, Q, M * D], got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.device() == value.device() && grad_output.is_contiguous(),
              "ms_deform_attn backward: grad_output must be contiguous, on value's device and of "
              "value's dtype");
  c10::cuda::CUDAGuard guard(value.device());
  const auto acc_dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  const int64_t points = grad_attn.numel();
  if (points == 0 || k.D == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "anydepth_ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t><<<blocks_for(points, kThreads / kWarp), kThreads, 0, stream>>>(
        value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
        level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
        attention_weights.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
        grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<scalar_t>(),
        grad_attn.mutable_data_ptr<scalar_t>(), points, k.S, k.M, k.D, k.L, k.Q, k.P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(anydepth, CUDA, m) {
  m.impl("_ext_ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("_ext_ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace anydepth
