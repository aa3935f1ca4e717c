// CPU backend of the factored (shared filter basis) conv block:
//
//   out = act((coeff @ conv(x, basis)) * scale + bias) + residual
//
// `basis` [R, C, KH, KW] holds the R basis filters (a layer's own ++ the stage's shared ones),
// `coeff` [C_out, R] the 1x1 coefficients with the basis norm folded in, (scale, bias) the output
// norm folded. One pass over bands of output rows: per band of B rows of one image, the library
// convolution (oneDNN through at::convolution: faster than any hand-written im2col here) of the
// input rows under it into a band-sized intermediate [R, B * OW], the coefficient GEMM straight
// into the output (a strided view), then the epilogue in place while the band is in cache. The
// intermediate exists per band and per thread only, in a cache-sized buffer (the band and its
// input rows within ~1 MB; a small map fits in one band), never as a tensor of a large map that
// goes out to memory and is read back. Bands run in parallel (at::parallel_for); the
// convolution and GEMM are single-threaded inside the parallel region. Horizontal padding is the
// convolution's; so is the vertical padding of a border band where it lines up with the stride,
// otherwise (and for a band of padding rows only) the band is padded by a small copy.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../conv_norm_act.h"
#include "epilogue_isa.h"

namespace anydepth {
namespace {

struct ConvGeom {
  int64_t C, H, W, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW;
};

template <int64_t ACT, typename acc_t>
inline acc_t activate(acc_t z) {
  if constexpr (ACT == kRelu) {
    return z < acc_t(0) ? acc_t(0) : z;
  } else if constexpr (ACT == kSilu) {
    return z / (acc_t(1) + std::exp(-z));
  } else {
    return z;
  }
}

// Epilogue over one output row segment (one channel: scalar scale and bias), in place.
template <int64_t ACT, typename T>
void epilogue_row(T* o, float s, float b, const T* r, int64_t n) {
  using acc_t = at::opmath_type<T>;
  for (int64_t k = 0; k < n; ++k) {
    acc_t a = activate<ACT, acc_t>(static_cast<acc_t>(o[k]) * s + b);
    if (r != nullptr) a += static_cast<acc_t>(r[k]);
    o[k] = static_cast<T>(a);
  }
}

template <typename T>
void epilogue_rows_generic(T* o, int64_t ld, const float* s, const float* b, const T* r,
                           int64_t Cout, int64_t tn, int64_t act) {
  for (int64_t co = 0; co < Cout; ++co) {
    T* orow = o + co * ld;
    const T* rrow = r != nullptr ? r + co * ld : nullptr;
    if (act == kRelu) {
      epilogue_row<kRelu>(orow, s[co], b[co], rrow, tn);
    } else if (act == kSilu) {
      epilogue_row<kSilu>(orow, s[co], b[co], rrow, tn);
    } else {
      epilogue_row<kIdentity>(orow, s[co], b[co], rrow, tn);
    }
  }
}

// The epilogue over one tile [Cout, tn] of the output (row stride ld), in place: fp32 through the
// vectorised rows of the best instruction set (one channel per call), other dtypes generic.
template <typename T>
void tile_epilogue(T* o, int64_t ld, const float* s, const float* b, const T* r, int64_t Cout,
                   int64_t tn, int64_t act, RowsF32) {
  epilogue_rows_generic<T>(o, ld, s, b, r, Cout, tn, act);
}

void tile_epilogue(float* o, int64_t ld, const float* s, const float* b, const float* r,
                   int64_t Cout, int64_t tn, int64_t act, RowsF32 rows_f32) {
  for (int64_t co = 0; co < Cout; ++co) {
    float* orow = o + co * ld;
    rows_f32(orow, orow, s + co, b + co, r != nullptr ? r + co * ld : nullptr, act, 0, 1, 1, tn, false);
  }
}

// Output rows per band: the input band and the intermediate stay within ~kBandElems elements,
// at least one row, and one band per thread at least (fewer, taller bands: the library
// convolution loses efficiency on short bands).
int64_t band_rows(const ConvGeom& g, int64_t N, int64_t R) {
  constexpr int64_t kBandElems = 262144;
  int64_t b = 1;
  while (b < g.OH) {
    const int64_t nb = b + 1;
    const int64_t in_rows = (nb - 1) * g.sh + (g.KH - 1) * g.dh + 1;
    if (g.C * in_rows * g.W + R * nb * g.OW > kBandElems) break;
    b = nb;
  }
  const int64_t threads = at::get_num_threads();
  if (threads > 1) {
    const int64_t per = (N * g.OH + threads - 1) / threads;
    b = std::min(b, std::max<int64_t>(1, per));
  }
  return b;
}

at::Tensor basis_conv_norm_act_cpu(const at::Tensor& x_in, const at::Tensor& basis,
                                   const at::Tensor& coeff, const at::Tensor& scale,
                                   const at::Tensor& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act,
                                   const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x_in.dim() == 4 && basis.dim() == 4, "anydepth: basis_conv_norm_act needs a 4-D x and basis");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "anydepth: stride, padding and dilation must have two entries");
  // Detached: the GEMMs below run on at::parallel_for's worker threads, where the caller's
  // thread-local autograd state (the custom op's no-grad redispatch) does not hold.
  const at::Tensor x = x_in.detach().contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t R = basis.size(0), KH = basis.size(2), KW = basis.size(3);
  TORCH_CHECK(basis.size(1) == C, "anydepth: the basis reads ", basis.size(1), " channels, x has ", C);
  const int64_t Cout = coeff.size(0);
  TORCH_CHECK(coeff.numel() == Cout * R, "anydepth: coeff must be [C_out, ", R, "(, 1, 1)], got ",
              coeff.sizes());
  TORCH_CHECK(basis.scalar_type() == x.scalar_type() && coeff.scalar_type() == x.scalar_type(),
              "anydepth: x, basis and coeff must share a dtype");
  ConvGeom g{C, H, W, KH, KW, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], 0, 0};
  TORCH_CHECK(g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0,
              "anydepth: invalid stride, padding or dilation");
  g.OH = (H + 2 * g.ph - g.dh * (KH - 1) - 1) / g.sh + 1;
  g.OW = (W + 2 * g.pw - g.dw * (KW - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "anydepth: the input is too small for the kernel");
  at::Tensor out = at::empty({N, Cout, g.OH, g.OW}, x.options());
  check_epilogue_args(out, scale, bias, act, residual);
  if (out.numel() == 0) return out;
  at::Tensor res;
  if (residual.has_value()) res = residual->detach().contiguous();
  const at::Tensor basis_c = basis.detach().contiguous();
  const at::Tensor coeff2 = coeff.detach().reshape({Cout, R}).contiguous();
  const at::Tensor s = scale.contiguous(), b = bias.contiguous();
  const int64_t P = g.OH * g.OW;
  const int64_t B = band_rows(g, N, R);
  const int64_t bands = (g.OH + B - 1) / B;
  const RowsF32 rows_f32 = best_rows_f32();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "anydepth_basis_conv", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    const float* sp = s.const_data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    at::parallel_for(0, N * bands, 1, [&](int64_t begin, int64_t end) {
      at::NoGradGuard no_grad;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / bands, oy0 = (task % bands) * B;
        const int64_t ob = std::min(B, g.OH - oy0);
        // Input rows [iy0, iy1) under the band; rows outside the image are zero padding.
        const int64_t iy0 = oy0 * g.sh - g.ph;
        const int64_t iy1 = (oy0 + ob - 1) * g.sh - g.ph + (g.KH - 1) * g.dh + 1;
        const int64_t lo = std::max<int64_t>(0, iy0), hi = std::min(H, iy1);
        at::Tensor mid;  // [1, R, rows, OW]; the band's output rows start at row j0
        int64_t j0 = 0;
        const bool border = lo > iy0 || hi < iy1;
        // A border band lets the convolution pad (symmetric ph rows) where that lands on the band's
        // rows: no copy; the extra output rows the other side's padding adds are not read.
        const int64_t shift = iy0 - (lo - g.ph);
        const bool conv_pads = border && hi > lo && shift >= 0 && shift % g.sh == 0;
        if (conv_pads) {
          j0 = shift / g.sh;
          mid = at::convolution(x.narrow(0, n, 1).narrow(2, lo, hi - lo), basis_c, std::nullopt, {g.sh, g.sw},
                                {g.ph, g.pw}, {g.dh, g.dw}, /*transposed=*/false, {0, 0}, 1);
        } else {
          at::Tensor band;
          if (hi <= lo) {
            band = at::zeros({1, C, iy1 - iy0, W}, x.options());
          } else {
            band = x.narrow(0, n, 1).narrow(2, lo, hi - lo);
            if (border) band = at::constant_pad_nd(band, {0, 0, lo - iy0, iy1 - hi}, 0);
          }
          mid = at::convolution(band, basis_c, std::nullopt, {g.sh, g.sw}, {0, g.pw}, {g.dh, g.dw},
                                /*transposed=*/false, {0, 0}, 1);
        }
        mid = mid.contiguous();
        const int64_t rows = mid.size(2);
        TORCH_CHECK(mid.size(3) == g.OW && j0 + ob <= rows, "anydepth: internal error (band shape)");
        // [R, ob * OW] rows of the band output: channel stride rows * OW (a strided BLAS operand).
        const at::Tensor mid2 = mid.as_strided({R, ob * g.OW}, {rows * g.OW, 1}, mid.storage_offset() + j0 * g.OW);
        at::Tensor o = out.select(0, n).view({Cout, P}).narrow(1, oy0 * g.OW, ob * g.OW);
        at::mm_out(o, coeff2, mid2);
        scalar_t* ot = op + n * Cout * P + oy0 * g.OW;
        const scalar_t* rt = rp != nullptr ? rp + n * Cout * P + oy0 * g.OW : nullptr;
        tile_epilogue(ot, P, sp, bp, rt, Cout, ob * g.OW, act, rows_f32);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anydepth, m) {
  m.def(
      "_ext_basis_conv_norm_act(Tensor x, Tensor basis, Tensor coeff, Tensor scale, Tensor bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int act, Tensor? residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(anydepth, CPU, m) {
  m.impl("_ext_basis_conv_norm_act", &basis_conv_norm_act_cpu);
}

}  // namespace anydepth
