// CPU backend of the switchable conv block.
//
// The convolution is the library's (oneDNN through at::convolution: faster than anything written
// here); the epilogue (scale, bias, activation, residual) is one fused pass over the convolution's
// output, in place, parallel over planes (NCHW) or pixels (channels-last). float32, the common
// case, runs rows compiled for the best instruction set of the machine (AVX-512, AVX2+FMA or the
// SSE2 baseline; epilogue_rows.inc), chosen once at load; ANYDEPTH_CPU_ISA=base|avx2|avx512
// forces one. float64/float16/bfloat16 use the generic templates below.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../conv_norm_act.h"
#include "epilogue_isa.h"

#include <cstdlib>
#include <string>

namespace anydepth {
namespace {

template <int64_t ACT, typename acc_t>
inline acc_t activate(acc_t z) {
  if constexpr (ACT == kRelu) {
    return z > acc_t(0) ? z : acc_t(0);
  } else if constexpr (ACT == kSilu) {
    return z / (acc_t(1) + std::exp(-z));
  } else {
    return z;
  }
}

// One NCHW plane: a single channel, so scale and bias are scalars.
template <int64_t ACT, bool RES, typename T>
void plane(T* out, const T* in, float s, float b, const T* res, int64_t n) {
  using acc_t = at::opmath_type<T>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    acc_t a = activate<ACT, acc_t>(static_cast<acc_t>(in[i]) * s + b);
    if constexpr (RES) a += static_cast<acc_t>(res[i]);
    out[i] = static_cast<T>(a);
  }
}

// One channels-last pixel: all C channels, per-channel scale and bias.
template <int64_t ACT, bool RES, typename T>
void pixel(T* out, const T* in, const float* s, const float* b, const T* res, int64_t C) {
  using acc_t = at::opmath_type<T>;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    acc_t a = activate<ACT, acc_t>(static_cast<acc_t>(in[c]) * s[c] + b[c]);
    if constexpr (RES) a += static_cast<acc_t>(res[c]);
    out[c] = static_cast<T>(a);
  }
}

template <int64_t ACT, bool RES, typename T>
void run_epilogue(T* out, const T* in, const float* scale, const float* bias, const T* res,
                  int64_t N, int64_t C, int64_t HW, bool channels_last) {
  constexpr int64_t kGrainElems = 32768;
  if (!channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(HW, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t off = p * HW;
        plane<ACT, RES>(out + off, in + off, scale[p % C], bias[p % C], RES ? res + off : nullptr,
                        HW);
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1));
    at::parallel_for(0, N * HW, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t off = p * C;
        pixel<ACT, RES>(out + off, in + off, scale, bias, RES ? res + off : nullptr, C);
      }
    });
  }
}

struct IsaChoice {
  RowsF32 fn;
  std::string name;
};

IsaChoice choose_isa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  std::string want = "auto";
  if (const char* env = std::getenv("ANYDEPTH_CPU_ISA")) want = env;
  TORCH_CHECK(want == "auto" || want == "base" || want == "avx2" || want == "avx512",
              "ANYDEPTH_CPU_ISA=", want, ": expected auto, base, avx2 or avx512");
  TORCH_CHECK(want != "avx512" || avx512, "ANYDEPTH_CPU_ISA=avx512 but this CPU lacks AVX-512");
  TORCH_CHECK(want != "avx2" || avx2, "ANYDEPTH_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
  if (want == "avx512" || (want == "auto" && avx512)) return {isa_avx512::rows_f32, "avx512"};
  if (want == "avx2" || (want == "auto" && avx2)) return {isa_avx2::rows_f32, "avx2"};
  return {isa_base::rows_f32, "base"};
}

const IsaChoice& isa() {
  static const IsaChoice choice = choose_isa();
  return choice;
}

void run_epilogue_f32(float* o, const float* i, const float* s, const float* b, const float* r,
                      int64_t act, int64_t N, int64_t C, int64_t HW, bool cl) {
  constexpr int64_t kGrainElems = 32768;
  const int64_t rows = cl ? N * HW : N * C;
  const int64_t row_len = cl ? C : HW;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(row_len, 1));
  const RowsF32 fn = isa().fn;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    fn(o, i, s, b, r, act, begin, end, C, HW, cl);
  });
}

template <typename T>
void run_epilogue_dispatch(T* o, const T* i, const float* s, const float* b, const T* r,
                           int64_t act, int64_t N, int64_t C, int64_t HW, bool cl) {
  const bool res = r != nullptr;
  switch (act) {
    case kRelu:
      return res ? run_epilogue<kRelu, true>(o, i, s, b, r, N, C, HW, cl)
                 : run_epilogue<kRelu, false>(o, i, s, b, r, N, C, HW, cl);
    case kSilu:
      return res ? run_epilogue<kSilu, true>(o, i, s, b, r, N, C, HW, cl)
                 : run_epilogue<kSilu, false>(o, i, s, b, r, N, C, HW, cl);
    default:
      return res ? run_epilogue<kIdentity, true>(o, i, s, b, r, N, C, HW, cl)
                 : run_epilogue<kIdentity, false>(o, i, s, b, r, N, C, HW, cl);
  }
}

// out may alias y (in-place epilogue over a fresh convolution output).
void epilogue_into(at::Tensor& out, const at::Tensor& y, const at::Tensor& scale,
                   const at::Tensor& bias, int64_t act, const std::optional<at::Tensor>& residual) {
  const auto fmt = epilogue_format(y);
  TORCH_CHECK(y.is_contiguous(fmt) && out.is_contiguous(fmt), "anydepth: internal layout error");
  at::Tensor res;
  if (residual.has_value()) res = residual->contiguous(fmt);
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const float* s = scale.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  if (y.scalar_type() == at::kFloat) {
    run_epilogue_f32(out.data_ptr<float>(), y.const_data_ptr<float>(), s, b,
                     res.defined() ? res.const_data_ptr<float>() : nullptr, act, N, C, HW, cl);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "anydepth_epilogue", [&] {
    run_epilogue_dispatch<scalar_t>(
        out.data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), s, b, res.defined() ? res.const_data_ptr<scalar_t>() : nullptr, act, N, C,
        HW, cl);
  });
}

at::Tensor scale_bias_act_cpu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias,
                              int64_t act, const std::optional<at::Tensor>& residual) {
  check_epilogue_args(y, scale, bias, act, residual);
  const auto fmt = epilogue_format(y);
  const at::Tensor yc = y.contiguous(fmt);
  at::Tensor out = at::empty_like(yc, yc.options(), fmt);
  epilogue_into(out, yc, scale.contiguous(), bias.contiguous(), act, residual);
  return out;
}

at::Tensor conv_norm_act_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                             const at::Tensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, int64_t act,
                             const std::optional<at::Tensor>& residual) {
  at::Tensor y = at::convolution(x, weight, std::nullopt, stride, padding, dilation,
                                 /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
  check_epilogue_args(y, scale, bias, act, residual);
  if (y.numel() == 0) return y;
  // The convolution's output is fresh: the epilogue overwrites it, no second buffer.
  y = y.contiguous(epilogue_format(y));
  epilogue_into(y, y, scale.contiguous(), bias.contiguous(), act, residual);
  return y;
}

// Concat-free 1x1 convolution: out[n] = W[:, :sum(C_i)] @ [x_0[n]; x_1[n]; ...] as a sum of
// GEMMs over per-branch column slices of W (strided views, no copy), then the epilogue in place.
// The concatenated input never exists; a shallow path that passes fewer branches reads only the
// first columns of W.
at::Tensor concat_conv1x1_cpu(at::TensorList xs, const at::Tensor& weight, const at::Tensor& scale,
                              const at::Tensor& bias, int64_t act,
                              const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(!xs.empty(), "anydepth: concat_conv1x1 needs at least one input");
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(x0.dim() == 4, "anydepth: concat_conv1x1 inputs must be 4-D");
  const int64_t N = x0.size(0), H = x0.size(2), W = x0.size(3), HW = H * W;
  const int64_t Cout = weight.size(0), Cin = weight.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1,
              "anydepth: concat_conv1x1 needs a 1x1 weight");
  int64_t total = 0;
  for (const auto& x : xs) {
    TORCH_CHECK(x.dim() == 4 && x.size(0) == N && x.size(2) == H && x.size(3) == W &&
                    x.scalar_type() == x0.scalar_type() && x.device() == x0.device(),
                "anydepth: concat_conv1x1 inputs must share batch, spatial size, dtype and device");
    total += x.size(1);
  }
  TORCH_CHECK(total <= Cin, "anydepth: inputs have ", total, " channels, the weight reads ", Cin);
  at::Tensor out = at::empty({N, Cout, H, W}, x0.options());
  check_epilogue_args(out, scale, bias, act, residual);
  if (out.numel() == 0) return out;
  const at::Tensor w2 = weight.reshape({Cout, Cin});
  for (int64_t n = 0; n < N; ++n) {
    at::Tensor o = out.select(0, n).view({Cout, HW});
    int64_t off = 0;
    bool first = true;
    for (const auto& x : xs) {
      const int64_t c = x.size(1);
      if (c == 0) continue;
      const at::Tensor xi = x.select(0, n).reshape({c, HW});
      const at::Tensor wi = w2.narrow(1, off, c);
      if (first) {
        at::mm_out(o, wi, xi);
        first = false;
      } else {
        o.addmm_(wi, xi);
      }
      off += c;
    }
    if (first) o.zero_();
  }
  epilogue_into(out, out, scale.contiguous(), bias.contiguous(), act, residual);
  return out;
}

}  // namespace

RowsF32 best_rows_f32() { return isa().fn; }

TORCH_LIBRARY_FRAGMENT(anydepth, m) {
  m.def(
      "_ext_concat_conv1x1(Tensor[] xs, Tensor weight, Tensor scale, Tensor bias, int act, "
      "Tensor? residual) -> Tensor");
  m.def("_ext_scale_bias_act(Tensor y, Tensor scale, Tensor bias, int act, Tensor? residual) -> Tensor");
  m.def("_ext_cpu_isa() -> str");
  m.def(
      "_ext_conv_norm_act(Tensor x, Tensor weight, Tensor scale, Tensor bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int act, Tensor? residual) -> Tensor");
}

// Which fp32 epilogue variant this machine runs (for extension_info and the tests).
TORCH_LIBRARY_IMPL(anydepth, CompositeExplicitAutograd, m) {
  m.impl("_ext_cpu_isa", [] { return isa().name; });
}

TORCH_LIBRARY_IMPL(anydepth, CPU, m) {
  m.impl("_ext_scale_bias_act", &scale_bias_act_cpu);
  m.impl("_ext_conv_norm_act", &conv_norm_act_cpu);
  m.impl("_ext_concat_conv1x1", &concat_conv1x1_cpu);
}

}  // namespace anydepth
