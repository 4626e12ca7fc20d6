// GroupNorm (+ optional swish) over NHWC float32 tensors as XLA:CPU FFI custom calls.
//
// Why: XLA:CPU runs the normalisation and swish fusions of the autoencoder single-threaded and
// its exp unvectorised, and autodiff adds transposed reductions in the backward pass. Here each
// pass is two sweeps over the tensor, parallel over the batch (OpenMP), with a vectorisable exp.
//
// Forward:  (x [B,H,W,C], scale [C], bias [C]) -> (out [B,H,W,C], mean [B,G], rstd [B,G])
//   mean, var = E[x], max(E[x^2] - E[x]^2, 0) over each example's (H, W, C/G) group (float64
//   sums); rstd = 1/sqrt(var + epsilon); y = (x - mean) * rstd * scale + bias;
//   out = swish ? y * sigmoid(y) : y.
// Backward: (x, scale, bias, mean, rstd, dout) -> (dx, dscale, dbias), with dy = dout * swish'(y)
//   and g = dy * scale: dx = rstd * (g - mean_group(g) - xhat * mean_group(g * xhat)),
//   dscale = sum_{b,h,w} dy * xhat, dbias = sum_{b,h,w} dy (xhat = (x - mean) * rstd).

#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(x) for x in float range (Cephes' expf polynomial, ~1 ulp), written so that compilers
// vectorise loops calling it (no table, no library call).
inline float Exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (std::floor would not vectorise).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3333337680e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * x * x + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline float Sigmoid(float y) { return 1.0f / (1.0f + Exp(-y)); }

struct Shape {
  int64_t b, hw, c, g, cg;
};

ffi::Error GetShape(const ffi::AnyBuffer& x, int32_t groups, Shape* s) {
  auto d = x.dimensions();
  if (d.size() != 4 || x.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("group_norm: expected a float32 NHWC tensor");
  }
  if (groups <= 0 || d[3] % groups) {
    return ffi::Error::InvalidArgument("group_norm: channels not divisible by num_groups");
  }
  *s = {d[0], d[1] * d[2], d[3], groups, d[3] / groups};
  return ffi::Error::Success();
}

// Per-example coefficients y = x * mul[c] + add[c].
inline void Coefficients(const Shape& s, const float* scale, const float* bias, const float* mean,
                         const float* rstd, float* mul, float* add) {
  for (int64_t c = 0; c < s.c; ++c) {
    const int64_t g = c / s.cg;
    mul[c] = rstd[g] * scale[c];
    add[c] = bias[c] - mean[g] * mul[c];
  }
}

ffi::Error ForwardImpl(ffi::AnyBuffer x_buf, ffi::AnyBuffer scale_buf, ffi::AnyBuffer bias_buf,
                       ffi::Result<ffi::AnyBuffer> out_buf, ffi::Result<ffi::AnyBuffer> mean_buf,
                       ffi::Result<ffi::AnyBuffer> rstd_buf, int32_t groups, float epsilon,
                       bool swish) {
  Shape s;
  if (auto err = GetShape(x_buf, groups, &s); err.failure()) return err;
  const float* x = static_cast<const float*>(x_buf.untyped_data());
  const float* scale = static_cast<const float*>(scale_buf.untyped_data());
  const float* bias = static_cast<const float*>(bias_buf.untyped_data());
  float* out = static_cast<float*>(out_buf->untyped_data());
  float* mean = static_cast<float*>(mean_buf->untyped_data());
  float* rstd = static_cast<float*>(rstd_buf->untyped_data());
  const double count = static_cast<double>(s.hw * s.cg);

#pragma omp parallel
  {
    std::vector<double> sum(s.c), sq(s.c);
    std::vector<float> mul(s.c), add(s.c);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < s.b; ++b) {
      const float* xb = x + b * s.hw * s.c;
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(sq.begin(), sq.end(), 0.0);
      double* __restrict__ su = sum.data();
      double* __restrict__ sq2 = sq.data();
      for (int64_t p = 0; p < s.hw; ++p) {
        const float* row = xb + p * s.c;
#pragma omp simd
        for (int64_t c = 0; c < s.c; ++c) {
          su[c] += row[c];
          sq2[c] += static_cast<double>(row[c]) * row[c];
        }
      }
      for (int64_t g = 0; g < s.g; ++g) {
        double m = 0.0, m2 = 0.0;
        for (int64_t c = g * s.cg; c < (g + 1) * s.cg; ++c) {
          m += sum[c];
          m2 += sq[c];
        }
        m /= count;
        const double var = std::fmax(m2 / count - m * m, 0.0);
        mean[b * s.g + g] = static_cast<float>(m);
        rstd[b * s.g + g] = static_cast<float>(1.0 / std::sqrt(var + epsilon));
      }
      Coefficients(s, scale, bias, mean + b * s.g, rstd + b * s.g, mul.data(), add.data());
      float* ob = out + b * s.hw * s.c;
      const float* __restrict__ mu = mul.data();
      const float* __restrict__ ad = add.data();
      for (int64_t p = 0; p < s.hw; ++p) {
        const float* row = xb + p * s.c;
        float* orow = ob + p * s.c;
        if (swish) {
#pragma omp simd
          for (int64_t c = 0; c < s.c; ++c) {
            const float y = row[c] * mu[c] + ad[c];
            orow[c] = y * Sigmoid(y);
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < s.c; ++c) orow[c] = row[c] * mu[c] + ad[c];
        }
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::AnyBuffer x_buf, ffi::AnyBuffer scale_buf, ffi::AnyBuffer bias_buf,
                        ffi::AnyBuffer mean_buf, ffi::AnyBuffer rstd_buf, ffi::AnyBuffer dout_buf,
                        ffi::Result<ffi::AnyBuffer> dx_buf, ffi::Result<ffi::AnyBuffer> dscale_buf,
                        ffi::Result<ffi::AnyBuffer> dbias_buf, int32_t groups, bool swish) {
  Shape s;
  if (auto err = GetShape(x_buf, groups, &s); err.failure()) return err;
  const float* x = static_cast<const float*>(x_buf.untyped_data());
  const float* scale = static_cast<const float*>(scale_buf.untyped_data());
  const float* bias = static_cast<const float*>(bias_buf.untyped_data());
  const float* mean = static_cast<const float*>(mean_buf.untyped_data());
  const float* rstd = static_cast<const float*>(rstd_buf.untyped_data());
  const float* dout = static_cast<const float*>(dout_buf.untyped_data());
  float* dx = static_cast<float*>(dx_buf->untyped_data());
  const double count = static_cast<double>(s.hw * s.cg);
  // Per-example parameter gradients, summed over the batch in a fixed order afterwards.
  std::vector<double> dscale_b(s.b * s.c), dbias_b(s.b * s.c);

#pragma omp parallel
  {
    std::vector<double> sum_dy(s.c), sum_dyx(s.c), m1(s.g), m2(s.g);
    std::vector<float> mul(s.c), add(s.c), c1(s.c), c0(s.c);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < s.b; ++b) {
      const float* xb = x + b * s.hw * s.c;
      const float* db = dout + b * s.hw * s.c;
      float* dxb = dx + b * s.hw * s.c;
      const float* mb = mean + b * s.g;
      const float* rb = rstd + b * s.g;
      Coefficients(s, scale, bias, mb, rb, mul.data(), add.data());
      std::fill(sum_dy.begin(), sum_dy.end(), 0.0);
      std::fill(sum_dyx.begin(), sum_dyx.end(), 0.0);
      // Sweep 1: dy (kept in dx) and its per-channel sums.
      const float* __restrict__ mu = mul.data();
      const float* __restrict__ ad = add.data();
      double* __restrict__ s1 = sum_dy.data();
      double* __restrict__ s2 = sum_dyx.data();
      for (int64_t p = 0; p < s.hw; ++p) {
        const float* row = xb + p * s.c;
        const float* drow = db + p * s.c;
        float* dyrow = dxb + p * s.c;
#pragma omp simd
        for (int64_t c = 0; c < s.c; ++c) {
          float dy = drow[c];
          if (swish) {
            const float y = row[c] * mu[c] + ad[c];
            const float sg = Sigmoid(y);
            dy *= sg * (1.0f + y * (1.0f - sg));
          }
          dyrow[c] = dy;
          s1[c] += dy;
          s2[c] += static_cast<double>(dy) * row[c];
        }
      }
      // sum dy * xhat = rstd * (sum dy * x - mean * sum dy), per channel.
      std::fill(m1.begin(), m1.end(), 0.0);
      std::fill(m2.begin(), m2.end(), 0.0);
      for (int64_t c = 0; c < s.c; ++c) {
        const int64_t g = c / s.cg;
        const double dyxhat = rb[g] * (sum_dyx[c] - mb[g] * sum_dy[c]);
        dscale_b[b * s.c + c] = dyxhat;
        dbias_b[b * s.c + c] = sum_dy[c];
        m1[g] += scale[c] * sum_dy[c];
        m2[g] += scale[c] * dyxhat;
      }
      // dx = rstd * (scale * dy - m1 - xhat * m2) = c1[c] * dy + (x - mean) * c2 + c0.
      for (int64_t c = 0; c < s.c; ++c) {
        const int64_t g = c / s.cg;
        const double a = m1[g] / count, bm = m2[g] / count;
        c1[c] = rb[g] * scale[c];
        // -rstd * (a + (x - mean) * rstd * bm) = x * (-rstd^2 bm) + rstd * (mean rstd bm - a)
        mul[c] = static_cast<float>(-static_cast<double>(rb[g]) * rb[g] * bm);
        c0[c] = static_cast<float>(rb[g] * (mb[g] * rb[g] * bm - a));
      }
      // Sweep 2: dx in place of dy.
      const float* __restrict__ k1 = c1.data();
      const float* __restrict__ k0 = c0.data();
      for (int64_t p = 0; p < s.hw; ++p) {
        const float* row = xb + p * s.c;
        float* dxrow = dxb + p * s.c;
#pragma omp simd
        for (int64_t c = 0; c < s.c; ++c) dxrow[c] = k1[c] * dxrow[c] + row[c] * mu[c] + k0[c];
      }
    }
  }
  float* dscale = static_cast<float*>(dscale_buf->untyped_data());
  float* dbias = static_cast<float*>(dbias_buf->untyped_data());
  for (int64_t c = 0; c < s.c; ++c) {
    double ds = 0.0, dbb = 0.0;
    for (int64_t b = 0; b < s.b; ++b) {
      ds += dscale_b[b * s.c + c];
      dbb += dbias_b[b * s.c + c];
    }
    dscale[c] = static_cast<float>(ds);
    dbias[c] = static_cast<float>(dbb);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VqGroupNormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("num_groups")
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("swish"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VqGroupNormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("num_groups")
                                  .Attr<bool>("swish"));
