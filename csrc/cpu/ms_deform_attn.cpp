// CPU backend of multi-scale deformable attention (forward and backward); see ../ms_deform_attn.h
// for the layout and the sampling convention.
//
// Forward: parallel over (batch x query) rows with at::parallel_for; each row computes all heads.
// For every sampling point the four bilinear corners are fused with the attention weight into
// four coefficients, and the output row of D contiguous channels is updated in one vectorised
// pass (corners outside the map read a row of zeros instead of branching): no intermediate
// sampled tensor.
//
// Backward: grad_value is accumulated without atomics. Each task owns the value slice of one
// (batch, head) pair, value[n, :, m, :], which no other task writes; when there are fewer such
// slices than threads, the query range of each slice is also split and every split accumulates
// into its own zeroed [S, D] buffer, summed into grad_value afterwards in a fixed order (no
// atomics: for a given thread count the result is deterministic). grad_sampling_locations and
// grad_attention_weights have one writer per element.
//
// Non-finite inputs follow the reference (grid_sample): a non-finite sampling location samples
// NaN, a non-finite attention weight multiplies the sample (inf * 0 = NaN), NaN in value spreads
// through the corners that read it. The float32 hot loops are compiled for AVX-512, AVX2+FMA and
// the baseline and chosen once, at first use (ANYDEPTH_CPU_ISA forces one, as for the conv
// epilogue).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "../ms_deform_attn.h"

namespace anydepth {
namespace {

#define ANYDEPTH_ALWAYS_INLINE inline __attribute__((always_inline))

// One sampling point resolved into its four corners: offsets (in rows of the value tensor, -1
// when the corner is outside the map) and bilinear weights, in the order
// (x0, y0), (x1, y0), (x0, y1), (x1, y1).
template <typename T>
struct Corners {
  int64_t row[4];
  T w[4];
  T fx, fy;
};

// Pixel coordinates (x, y) of a point known to be finite and inside [-1, W) x [-1, H) (at
// x = -1 the corner x = 0 has weight 0 but, as in grid_sample, a gradient).
template <typename T>
ANYDEPTH_ALWAYS_INLINE Corners<T> corners(T x, T y, int64_t H, int64_t W, int64_t start) {
  Corners<T> c;
  const T xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  c.fx = x - xf;
  c.fy = y - yf;
  const T gx = T(1) - c.fx, gy = T(1) - c.fy;
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

template <typename T>
inline bool finite(T v) {
  return std::isfinite(v);
}

// Work of one (batch, query) row: out[m, :] for every head m.
//   value_n: value[n] ([S, M, D]); loc_q: loc[n, q] ([M, L, P, 2]); attn_q: attn[n, q];
//   out_q: out[n, q] ([M, D]); zeros: D zeros.
template <typename T>
ANYDEPTH_ALWAYS_INLINE void forward_row(
    const T* __restrict__ value_n, const int64_t* shapes, const int64_t* starts,
    const T* __restrict__ loc_q, const T* __restrict__ attn_q, T* __restrict__ out_q,
    const T* zeros, int64_t M, int64_t D, int64_t L, int64_t P) {
  const int64_t row_stride = M * D;
  for (int64_t m = 0; m < M; ++m) {
    T* __restrict__ o = out_q + m * D;
    for (int64_t d = 0; d < D; ++d) o[d] = T(0);
    const T* vm = value_n + m * D;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
      for (int64_t p = 0; p < P; ++p) {
        const int64_t idx = (m * L + l) * P + p;
        const T a = attn_q[idx];
        const T x = loc_q[2 * idx] * static_cast<T>(W) - T(0.5);
        const T y = loc_q[2 * idx + 1] * static_cast<T>(H) - T(0.5);
        if (!(finite(x) && finite(y))) {
          // grid_sample samples NaN at a non-finite location.
          for (int64_t d = 0; d < D; ++d) o[d] += std::numeric_limits<T>::quiet_NaN();
          continue;
        }
        const bool inside = x >= T(-1) && y >= T(-1) && x < static_cast<T>(W) && y < static_cast<T>(H);
        if (!inside) {
          if (!finite(a)) {  // a * 0, as in the reference: NaN for inf or NaN weights
            for (int64_t d = 0; d < D; ++d) o[d] += a * T(0);
          }
          continue;
        }
        const Corners<T> c = corners(x, y, H, W, start);
        const T* __restrict__ v0 = c.row[0] >= 0 ? vm + c.row[0] * row_stride : zeros;
        const T* __restrict__ v1 = c.row[1] >= 0 ? vm + c.row[1] * row_stride : zeros;
        const T* __restrict__ v2 = c.row[2] >= 0 ? vm + c.row[2] * row_stride : zeros;
        const T* __restrict__ v3 = c.row[3] >= 0 ? vm + c.row[3] * row_stride : zeros;
        if (finite(a)) {
          const T w0 = a * c.w[0], w1 = a * c.w[1], w2 = a * c.w[2], w3 = a * c.w[3];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
        } else {  // weight the sample, not the corners: inf * 0 = NaN as in the reference
          for (int64_t d = 0; d < D; ++d)
            o[d] += a * (c.w[0] * v0[d] + c.w[1] * v1[d] + c.w[2] * v2[d] + c.w[3] * v3[d]);
        }
      }
    }
  }
}

template <typename T>
ANYDEPTH_ALWAYS_INLINE void forward_rows(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                  const T* attn, T* out, const T* zeros, const MsDeformDims& k, int64_t begin,
                  int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / k.Q;
    forward_row<T>(value + n * k.S * k.M * k.D, shapes, starts, loc + r * k.M * k.L * k.P * 2,
                   attn + r * k.M * k.L * k.P, out + r * k.M * k.D, zeros, k.M, k.D, k.L, k.P);
  }
}

// float32 rows compiled for three instruction sets (the inlined body is generated per target).
#define ANYDEPTH_FWD_F32(suffix, target)                                                        \
  target void forward_rows_f32_##suffix(const float* value, const int64_t* shapes,              \
                                        const int64_t* starts, const float* loc,                \
                                        const float* attn, float* out, const float* zeros,      \
                                        const MsDeformDims& k, int64_t begin, int64_t end) {    \
    forward_rows<float>(value, shapes, starts, loc, attn, out, zeros, k, begin, end);           \
  }
ANYDEPTH_FWD_F32(avx512, __attribute__((target("avx512f,avx512vl,avx2,fma"))))
ANYDEPTH_FWD_F32(avx2, __attribute__((target("avx2,fma"))))
ANYDEPTH_FWD_F32(base, )
#undef ANYDEPTH_FWD_F32

// The instruction set of the float32 kernels: the best this CPU has, or ANYDEPTH_CPU_ISA
// (auto|base|avx2|avx512, the variable the conv epilogue reads too) when set.
enum class Isa { kBase, kAvx2, kAvx512 };

Isa choose_isa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("ANYDEPTH_CPU_ISA");
  const std::string want = env ? env : "auto";
  TORCH_CHECK(want == "auto" || want == "base" || want == "avx2" || want == "avx512",
              "ANYDEPTH_CPU_ISA=", want, ": expected auto, base, avx2 or avx512");
  TORCH_CHECK(want != "avx512" || avx512, "ANYDEPTH_CPU_ISA=avx512 but this CPU lacks AVX-512");
  TORCH_CHECK(want != "avx2" || avx2, "ANYDEPTH_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
  if (want == "avx512" || (want == "auto" && avx512)) return Isa::kAvx512;
  if (want == "avx2" || (want == "auto" && avx2)) return Isa::kAvx2;
  return Isa::kBase;
}

Isa isa() {
  static const Isa chosen = choose_isa();
  return chosen;
}

void forward_rows_f32(const float* value, const int64_t* shapes, const int64_t* starts,
                      const float* loc, const float* attn, float* out, const float* zeros,
                      const MsDeformDims& k, int64_t begin, int64_t end) {
  switch (isa()) {
    case Isa::kAvx512:
      return forward_rows_f32_avx512(value, shapes, starts, loc, attn, out, zeros, k, begin, end);
    case Isa::kAvx2:
      return forward_rows_f32_avx2(value, shapes, starts, loc, attn, out, zeros, k, begin, end);
    default:
      return forward_rows_f32_base(value, shapes, starts, loc, attn, out, zeros, k, begin, end);
  }
}

template <typename T>
void run_forward_rows(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                      const T* attn, T* out, const T* zeros, const MsDeformDims& k, int64_t begin,
                      int64_t end) {
  if constexpr (std::is_same_v<T, float>) {
    forward_rows_f32(value, shapes, starts, loc, attn, out, zeros, k, begin, end);
  } else {
    forward_rows<T>(value, shapes, starts, loc, attn, out, zeros, k, begin, end);
  }
}

// Backward of one (batch, head) slice over queries [q_begin, q_end).
//   value_nm: &value[n, 0, m, 0]; gvalue: &grad_value_slice[0] with row stride gv_stride;
//   loc/attn/grad_out/grad_loc/grad_attn: full tensors. scratch: 4 * D writable values.
template <typename T>
ANYDEPTH_ALWAYS_INLINE void backward_slice(
    const T* __restrict__ value_nm, int64_t v_stride, const int64_t* shapes, const int64_t* starts,
    const T* __restrict__ loc, const T* __restrict__ attn, const T* __restrict__ grad_out,
    T* gvalue, int64_t gv_stride, T* __restrict__ grad_loc, T* __restrict__ grad_attn,
    const T* zeros, T* scratch, const MsDeformDims& k, int64_t n, int64_t m, int64_t q_begin,
    int64_t q_end) {
  const int64_t D = k.D, L = k.L, P = k.P;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t nqm = (n * k.Q + q) * k.M + m;
    const T* __restrict__ g = grad_out + nqm * D;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
      for (int64_t p = 0; p < P; ++p) {
        const int64_t idx = (nqm * L + l) * P + p;
        const T a = attn[idx];
        const T x = loc[2 * idx] * static_cast<T>(W) - T(0.5);
        const T y = loc[2 * idx + 1] * static_cast<T>(H) - T(0.5);
        if (!(finite(x) && finite(y))) {
          grad_attn[idx] = nan;
          grad_loc[2 * idx] = nan;
          grad_loc[2 * idx + 1] = nan;
          continue;
        }
        const bool inside = x >= T(-1) && y >= T(-1) && x < static_cast<T>(W) && y < static_cast<T>(H);
        if (!inside) {
          grad_attn[idx] = T(0);
          grad_loc[2 * idx] = T(0);
          grad_loc[2 * idx + 1] = T(0);
          continue;
        }
        const Corners<T> c = corners(x, y, H, W, start);
        const T* __restrict__ v0 = c.row[0] >= 0 ? value_nm + c.row[0] * v_stride : zeros;
        const T* __restrict__ v1 = c.row[1] >= 0 ? value_nm + c.row[1] * v_stride : zeros;
        const T* __restrict__ v2 = c.row[2] >= 0 ? value_nm + c.row[2] * v_stride : zeros;
        const T* __restrict__ v3 = c.row[3] >= 0 ? value_nm + c.row[3] * v_stride : zeros;
        // Corners outside the map write into their own row of scratch (discarded), so the
        // four destinations never overlap (and never overlap value or grad_out).
        T* __restrict__ g0 = c.row[0] >= 0 ? gvalue + c.row[0] * gv_stride : scratch;
        T* __restrict__ g1 = c.row[1] >= 0 ? gvalue + c.row[1] * gv_stride : scratch + D;
        T* __restrict__ g2 = c.row[2] >= 0 ? gvalue + c.row[2] * gv_stride : scratch + 2 * D;
        T* __restrict__ g3 = c.row[3] >= 0 ? gvalue + c.row[3] * gv_stride : scratch + 3 * D;
        const T w0 = a * c.w[0], w1 = a * c.w[1], w2 = a * c.w[2], w3 = a * c.w[3];
        T dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
        for (int64_t d = 0; d < D; ++d) {
          const T gd = g[d];
          dot0 += gd * v0[d];
          dot1 += gd * v1[d];
          dot2 += gd * v2[d];
          dot3 += gd * v3[d];
        }
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const T gd = g[d];
          g0[d] += w0 * gd;
          g1[d] += w1 * gd;
          g2[d] += w2 * gd;
          g3[d] += w3 * gd;
        }
        grad_attn[idx] = c.w[0] * dot0 + c.w[1] * dot1 + c.w[2] * dot2 + c.w[3] * dot3;
        const T gx = T(1) - c.fx, gy = T(1) - c.fy;
        grad_loc[2 * idx] = a * static_cast<T>(W) * (gy * (dot1 - dot0) + c.fy * (dot3 - dot2));
        grad_loc[2 * idx + 1] = a * static_cast<T>(H) * (gx * (dot2 - dot0) + c.fx * (dot3 - dot1));
      }
    }
  }
}

// Arguments of the backward of one slice, bundled to keep the per-ISA wrappers simple.
template <typename T>
struct BwdArgs {
  const T* value;
  const int64_t* shapes;
  const int64_t* starts;
  const T* loc;
  const T* attn;
  const T* grad_out;
  T* grad_loc;
  T* grad_attn;
  const T* zeros;
  MsDeformDims k;
};

template <typename T>
ANYDEPTH_ALWAYS_INLINE void backward_task(const BwdArgs<T>& b, const T* value_nm, int64_t v_stride,
                                          T* gvalue, int64_t gv_stride, T* scratch, int64_t n,
                   int64_t m, int64_t q_begin, int64_t q_end) {
  const MsDeformDims& k = b.k;
  backward_slice<T>(value_nm, v_stride, b.shapes, b.starts, b.loc, b.attn,
                    b.grad_out, gvalue, gv_stride, b.grad_loc, b.grad_attn, b.zeros, scratch, k, n,
                    m, q_begin, q_end);
}

#define ANYDEPTH_BWD_F32(suffix, target)                                                         \
  target void backward_task_f32_##suffix(                                                       \
      const BwdArgs<float>& b, const float* value_nm, int64_t v_stride, float* gvalue,            \
      int64_t gv_stride, float* scratch, int64_t n, int64_t m, int64_t q_begin, int64_t q_end) {  \
    backward_task<float>(b, value_nm, v_stride, gvalue, gv_stride, scratch, n, m, q_begin, q_end); \
  }
ANYDEPTH_BWD_F32(avx512, __attribute__((target("avx512f,avx512vl,avx2,fma"))))
ANYDEPTH_BWD_F32(avx2, __attribute__((target("avx2,fma"))))
ANYDEPTH_BWD_F32(base, )
#undef ANYDEPTH_BWD_F32

void backward_task_f32(const BwdArgs<float>& b, const float* value_nm, int64_t v_stride,
                       float* gvalue, int64_t gv_stride, float* scratch, int64_t n, int64_t m,
                       int64_t q_begin, int64_t q_end) {
  switch (isa()) {
    case Isa::kAvx512:
      return backward_task_f32_avx512(b, value_nm, v_stride, gvalue, gv_stride, scratch, n, m, q_begin,
                                      q_end);
    case Isa::kAvx2:
      return backward_task_f32_avx2(b, value_nm, v_stride, gvalue, gv_stride, scratch, n, m, q_begin,
                                      q_end);
    default:
      return backward_task_f32_base(b, value_nm, v_stride, gvalue, gv_stride, scratch, n, m, q_begin,
                                      q_end);
  }
}

template <typename T>
void run_backward_task(const BwdArgs<T>& b, const T* value_nm, int64_t v_stride, T* gvalue,
                       int64_t gv_stride, T* scratch, int64_t n, int64_t m, int64_t q_begin,
                       int64_t q_end) {
  if constexpr (std::is_same_v<T, float>) {
    backward_task_f32(b, value_nm, v_stride, gvalue, gv_stride, scratch, n, m, q_begin, q_end);
  } else {
    backward_task<T>(b, value_nm, v_stride, gvalue, gv_stride, scratch, n, m, q_begin, q_end);
  }
}

// The level table must stay inside value: the kernels index it unchecked. (The Python layer
// checks more: that the levels tile S exactly.)
void check_levels_cpu(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                      const MsDeformDims& k) {
  const int64_t* shapes = spatial_shapes.const_data_ptr<int64_t>();
  const int64_t* starts = level_start_index.const_data_ptr<int64_t>();
  for (int64_t l = 0; l < k.L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
    TORCH_CHECK(H > 0 && W > 0 && start >= 0 && H <= k.S && W <= k.S && start <= k.S - H * W,
                "ms_deform_attn: level ", l, " (", H, "x", W, " at ", start,
                ") does not fit in value's S=", k.S, " positions");
  }
}

// Work (multiply-adds) per query and head, to size the parallel grains.
inline int64_t work_per_qm(const MsDeformDims& k) {
  return std::max<int64_t>(1, k.L * k.P * 4 * k.D);
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const MsDeformDims k = check_ms_deform_args(value, spatial_shapes, level_start_index,
                                              sampling_locations, attention_weights);
  check_levels_cpu(spatial_shapes, level_start_index, k);
  at::Tensor out = at::empty({k.N, k.Q, k.M * k.D}, value.options());
  if (out.numel() == 0) return out;
  if (k.L == 0 || k.P == 0) return out.zero_();
  const int64_t* shapes = spatial_shapes.const_data_ptr<int64_t>();
  const int64_t* starts = level_start_index.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / (work_per_qm(k) * k.M));
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "anydepth_ms_deform_attn_forward_cpu", [&] {
    const std::vector<scalar_t> zeros(k.D, scalar_t(0));
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    const scalar_t* loc = sampling_locations.const_data_ptr<scalar_t>();
    const scalar_t* attn = attention_weights.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, k.N * k.Q, grain, [&](int64_t begin, int64_t end) {
      run_forward_rows<scalar_t>(v, shapes, starts, loc, attn, o, zeros.data(), k, begin, end);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
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
  check_levels_cpu(spatial_shapes, level_start_index, k);
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  if (grad_loc.numel() == 0 || k.D == 0 || k.S == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return {grad_value, grad_loc, grad_attn};
  }
  const int64_t slices = k.N * k.M;
  const int64_t threads = at::get_num_threads();
  // Splits of each slice's query range: 1 when the slices alone keep every thread busy.
  // The private buffers are capped at 2^26 elements in all; beyond that, one task per slice.
  int64_t splits =
      slices >= threads ? 1 : std::min<int64_t>(k.Q, (threads + slices - 1) / slices);
  if (splits > 1 && slices * splits * k.S * k.D > (int64_t(1) << 26)) splits = 1;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "anydepth_ms_deform_attn_backward_cpu", [&] {
    const std::vector<scalar_t> zeros(k.D, scalar_t(0));
    BwdArgs<scalar_t> b{value.const_data_ptr<scalar_t>(),
                        spatial_shapes.const_data_ptr<int64_t>(),
                        level_start_index.const_data_ptr<int64_t>(),
                        sampling_locations.const_data_ptr<scalar_t>(),
                        attention_weights.const_data_ptr<scalar_t>(),
                        grad_output.const_data_ptr<scalar_t>(),
                        grad_loc.mutable_data_ptr<scalar_t>(),
                        grad_attn.mutable_data_ptr<scalar_t>(),
                        zeros.data(),
                        k};
    scalar_t* gv = grad_value.mutable_data_ptr<scalar_t>();
    const int64_t gv_stride = k.M * k.D;
    const scalar_t* v = b.value;
    if (splits == 1) {
      // (Working on packed [S, D] copies of a head's strided slices was measured: slower.)
      at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scratch(4 * k.D);
        for (int64_t s = begin; s < end; ++s) {
          const int64_t n = s / k.M, m = s % k.M;
          const int64_t off = n * k.S * gv_stride + m * k.D;
          run_backward_task<scalar_t>(b, v + off, gv_stride, gv + off, gv_stride, scratch.data(),
                                      n, m, 0, k.Q);
        }
      });
      return;
    }
    // Fewer slices than threads: split the queries, one private [S, D] buffer per task.
    const int64_t tasks = slices * splits;
    std::vector<scalar_t> buffers(static_cast<size_t>(tasks * k.S * k.D), scalar_t(0));
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(4 * k.D);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t s = t / splits, part = t % splits;
        const int64_t n = s / k.M, m = s % k.M;
        const int64_t q0 = k.Q * part / splits, q1 = k.Q * (part + 1) / splits;
        run_backward_task<scalar_t>(b, v + n * k.S * gv_stride + m * k.D, gv_stride,
                                    buffers.data() + t * k.S * k.D, k.D, scratch.data(), n, m,
                                    q0, q1);
      }
    });
    // grad_value[n, s, m, :] = sum over the splits of that slice, in split order.
    at::parallel_for(0, k.N * k.S, std::max<int64_t>(1, 4096 / (k.M * k.D)), [&](int64_t begin,
                                                                                   int64_t end) {
      for (int64_t ns = begin; ns < end; ++ns) {
        const int64_t n = ns / k.S, s = ns % k.S;
        for (int64_t m = 0; m < k.M; ++m) {
          scalar_t* dst = gv + ns * gv_stride + m * k.D;
          for (int64_t part = 0; part < splits; ++part) {
            const scalar_t* src = buffers.data() + ((n * k.M + m) * splits + part) * k.S * k.D + s * k.D;
            for (int64_t d = 0; d < k.D; ++d) dst[d] += src[d];
          }
        }
      }
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anydepth, m) {
  m.def(
      "_ext_ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "_ext_ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(anydepth, CPU, m) {
  m.impl("_ext_ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("_ext_ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace anydepth
