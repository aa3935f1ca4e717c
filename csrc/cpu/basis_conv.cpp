// CPU backend of the factored (shared filter basis) conv block:
//
//   out = act((coeff @ conv(x, basis)) * scale + bias) + residual
//
// `basis` [R, C, KH, KW] holds the R basis filters (a layer's own ++ the stage's shared ones),
// `coeff` [C_out, R] the 1x1 coefficients with the basis norm folded in, (scale, bias) the output
// norm folded. One pass over tiles of output pixels: per tile of T pixels of one image, an im2col
// of the input patch [C*KH*KW, T], the basis GEMM into a tile-sized intermediate [R, T], the
// coefficient GEMM straight into the output (a strided view), then the epilogue in place while
// the tile is in cache. The intermediate exists per tile and per thread only (a few hundred KB at
// most), never as a tensor of the whole feature map. Tiles run in parallel (at::parallel_for);
// the GEMMs are ATen's (BLAS), single-threaded inside the parallel region.
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

// col[(c*KH + i)*KW + j][t] = x[c, oy*sh - ph + i*dh, ox*sw - pw + j*dw] (0 outside) for the
// pixels p0 .. p0+tn-1 of one image, row stride ld. Walks the tile by output-row segments so the
// inner loop is a strided (stride 1: contiguous) copy with the out-of-bounds ends zeroed.
template <typename T>
void im2col_tile(T* col, int64_t ld, const T* img, const ConvGeom& g, int64_t p0, int64_t tn) {
  for (int64_t c = 0; c < g.C; ++c) {
    const T* plane = img + c * g.H * g.W;
    for (int64_t i = 0; i < g.KH; ++i) {
      for (int64_t j = 0; j < g.KW; ++j) {
        T* dst = col + ((c * g.KH + i) * g.KW + j) * ld;
        int64_t t = 0;
        while (t < tn) {
          const int64_t p = p0 + t;
          const int64_t oy = p / g.OW, ox0 = p % g.OW;
          const int64_t seg = std::min(tn - t, g.OW - ox0);  // pixels left in this output row
          const int64_t iy = oy * g.sh - g.ph + i * g.dh;
          if (iy < 0 || iy >= g.H) {
            std::fill(dst + t, dst + t + seg, T(0));
          } else {
            const T* row = plane + iy * g.W;
            const int64_t off = j * g.dw - g.pw;
            for (int64_t s = 0; s < seg; ++s) {
              const int64_t ix = (ox0 + s) * g.sw + off;
              dst[t + s] = (ix >= 0 && ix < g.W) ? row[ix] : T(0);
            }
          }
          t += seg;
        }
      }
    }
  }
}

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

// Pixels per tile: the im2col tile and the intermediate stay within ~kTileElems elements, at
// least 16 pixels, and there are enough tiles to keep every thread busy.
int64_t tile_pixels(int64_t N, int64_t P, int64_t K, int64_t R) {
  constexpr int64_t kTileElems = 49152;
  int64_t t = std::max<int64_t>(16, kTileElems / std::max<int64_t>(K + R, 1));
  const int64_t threads = at::get_num_threads();
  if (threads > 1) {
    const int64_t want_tiles = 2 * threads;
    const int64_t per = (N * P + want_tiles - 1) / want_tiles;
    t = std::min(t, std::max<int64_t>(16, per));
  }
  return std::min(t, P);
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
  const at::Tensor basis2 = basis.detach().reshape({R, C * KH * KW}).contiguous();
  const at::Tensor coeff2 = coeff.detach().reshape({Cout, R}).contiguous();
  const at::Tensor s = scale.contiguous(), b = bias.contiguous();
  const int64_t P = g.OH * g.OW, K = C * KH * KW;
  const int64_t T = tile_pixels(N, P, K, R);
  const int64_t tiles = (P + T - 1) / T;
  const RowsF32 rows_f32 = best_rows_f32();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "anydepth_basis_conv", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    const float* sp = s.const_data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
      at::NoGradGuard no_grad;
      // Per-thread tile buffers: the im2col patch and the intermediate (never a whole map).
      at::Tensor col = at::empty({K, T}, x.options());
      at::Tensor mid = at::empty({R, T}, x.options());
      scalar_t* colp = col.data_ptr<scalar_t>();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / tiles, p0 = (task % tiles) * T;
        const int64_t tn = std::min(T, P - p0);
        im2col_tile<scalar_t>(colp, T, xp + n * C * H * W, g, p0, tn);
        at::Tensor mid_t = mid.narrow(1, 0, tn);
        at::mm_out(mid_t, basis2, col.narrow(1, 0, tn));
        at::Tensor o = out.select(0, n).view({Cout, P}).narrow(1, p0, tn);
        at::mm_out(o, coeff2, mid_t);
        scalar_t* ot = op + n * Cout * P + p0;
        const scalar_t* rt = rp != nullptr ? rp + n * Cout * P + p0 : nullptr;
        tile_epilogue(ot, P, sp, bp, rt, Cout, tn, act, rows_f32);
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
