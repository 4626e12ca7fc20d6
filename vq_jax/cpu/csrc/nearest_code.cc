// Exact nearest-code search (squared L2) for large codebooks, screened by a bfloat16 matmul, as
// an XLA:CPU FFI custom call.
//
// Why: above a few thousand codes the search is one [N, D] x [D, K] matmul, and in float32 the
// two cores of a small machine top out near their FMA peak (BENCHMARKS.md section 3b). CPUs with
// AVX512-BF16 or AMX compute a bfloat16 matmul (float32 accumulation) 2-3x faster. Rounding the
// operands to bfloat16 can reorder codes whose distances are close, so the bfloat16 distances
// only screen: a bound on their error keeps every code that could still be the nearest, and those
// few are rescored exactly, in float64 from the float32 inputs. The result is the exact nearest
// code (ties to the lowest index), as the exhaustive search gives.
//
// The bound. Codes and inputs are first centred on the codebook's mean (distances do not change;
// the bound shrinks when the codes share an offset): x' = x - mu, c' = c - mu in float32. For
// each code, s_c = |c'|^2 - 2 <bf16(x'), bf16(c')> (oneDNN matmul, float32 accumulation) differs
// from T_c = |x - c|^2 - |x - mu|^2 (exact arithmetic; the second term is the same for every
// code, so T orders the codes as the distance does) by at most
//   B_c = 2 eps |x'| |c'| + eta |c'|^2,
// eps = 1.25 (2^-7 + 2^-15 + 1.1 D 2^-24 + 2^-21): bfloat16 rounding of both operands (unit
// roundoff 2^-8 each; none for the float32 screen), float32 accumulation over D terms with
// Cauchy-Schwarz for sum |x'_i c'_i|, and the centring's rounding; eta = 2^-20: the float32
// |c'|^2 and the evaluation of s_c. Every code with s_c - B_c <= min_k (s_k + B_k) is a
// candidate; any other code is farther than some code.
// Candidates are rescored as sum_i (x_i - c_i)^2 in float64. A row whose candidates exceed
// `max_candidates` is searched exhaustively in float64 instead (rare; counted in `stats`).
//
// Layout: x [N, D] and codes [K, D] float32 -> indices [N] int32 and stats [2] int32
// (rows searched exhaustively, most candidates of one row). Rows are tiled by `rows`, codes
// blocked by `block`; OpenMP threads take row tiles, each computing its tile's bfloat16
// distances block by block with a cached oneDNN matmul primitive.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "onednn_engine.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

using vq_jax::Engine;

// bfloat16 bits of a float32, rounded to nearest even (NaN stays NaN).
inline uint16_t ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// v into element i of a bfloat16 (bf16) or float32 array.
inline void Store(char* base, int64_t i, float v, bool bf16) {
  if (bf16) {
    reinterpret_cast<uint16_t*>(base)[i] = ToBf16(v);
  } else {
    reinterpret_cast<float*>(base)[i] = v;
  }
}

// dst [rows, block] f32 = src [rows, D] bf16 x weights [D, block] bf16 (the weights in the
// primitive's own layout, reordered once per call from codes [block, D]).
struct Screen {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul prim;
  dnnl::reorder to_weights;  // codes [block, D] row-major (as [D, block] "ba") -> pd's layout
  memory::desc user_weights;
};

Screen* MakeScreen(int64_t rows, int64_t block, int64_t d, bool bf16) {
  const auto dt = bf16 ? memory::data_type::bf16 : memory::data_type::f32;
  memory::desc src({rows, d}, dt, tag::ab);
  memory::desc wei({d, block}, dt, tag::any);
  memory::desc dst({rows, block}, memory::data_type::f32, tag::ab);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc pd(Engine(), src, wei, dst, attr);
  memory::desc user({d, block}, dt, tag::ba);
  dnnl::reorder to_weights(dnnl::reorder::primitive_desc(Engine(), user, Engine(),
                                                         pd.weights_desc()));
  return new Screen{pd, dnnl::matmul(pd), to_weights, user};
}

Screen* CachedScreen(int64_t rows, int64_t block, int64_t d, bool bf16) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<Screen>> cache;
  const std::string key =
      std::to_string(rows) + "," + std::to_string(block) + "," + std::to_string(d) + (bf16 ? "b" : "f");
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second.get();
  Screen* s = MakeScreen(rows, block, d, bf16);
  cache.emplace(key, std::unique_ptr<Screen>(s));
  return s;
}

// A 64-byte aligned pointer into a vector kept between calls (per thread and slot).
template <typename T>
T* Scratch(std::vector<char>& buf, size_t count) {
  const size_t size = count * sizeof(T) + 64;
  if (buf.size() < size) buf.resize(size);
  return reinterpret_cast<T*>(buf.data() +
                              (64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64);
}

double ExactDistance(const float* x, const float* c, int64_t d) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) {
    const double diff = static_cast<double>(x[i]) - static_cast<double>(c[i]);
    sum += diff * diff;
  }
  return sum;
}

// The lowest index among index_at(0), ..., index_at(count - 1) (ascending code indices) with the
// smallest float64 distance to x.
template <typename IndexAt>
int32_t Nearest(const float* x, const float* codes, int64_t d, int64_t count, IndexAt index_at) {
  double best = std::numeric_limits<double>::infinity();
  int32_t best_i = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t k = index_at(j);
    const double dist = ExactDistance(x, codes + k * d, d);
    if (dist < best) {
      best = dist;
      best_i = static_cast<int32_t>(k);
    }
  }
  return best_i;
}

struct Shape {
  int64_t n, k, d;
};

// out[r] = the screen's dtype of v[r] - mu for r < valid, zeros up to padded rows; sq[r] and
// norm[r] = |out[r]|^2 and |out[r]| (of the float32 difference, summed in float64).
void Centre(const float* v, int64_t valid, int64_t padded, int64_t d, const float* mu, bool bf16,
            char* out, float* sq, float* norm) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < padded; ++r) {
    double acc = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      const float diff = r < valid ? v[r * d + i] - mu[i] : 0.0f;
      Store(out, r * d + i, diff, bf16);
      acc += static_cast<double>(diff) * diff;
    }
    sq[r] = static_cast<float>(acc);
    norm[r] = static_cast<float>(std::sqrt(acc));
  }
}

ffi::Error NearestCodeImpl(ffi::Buffer<ffi::F32> x_buf, ffi::Buffer<ffi::F32> codes_buf,
                           ffi::ResultBuffer<ffi::S32> out, ffi::ResultBuffer<ffi::S32> stats,
                           int64_t rows, int64_t block, int64_t max_candidates,
                           int64_t screen_bits) {
  const auto xd = x_buf.dimensions(), cd = codes_buf.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || xd[1] != cd[1] || cd[0] < 1) {
    return ffi::Error::InvalidArgument("nearest_code: expected x [N, D] and codes [K, D], K >= 1");
  }
  if (rows < 1 || block < 1 || max_candidates < 1) {
    return ffi::Error::InvalidArgument("nearest_code: rows, block and max_candidates must be >= 1");
  }
  if (screen_bits != 16 && screen_bits != 32) {
    return ffi::Error::InvalidArgument("nearest_code: screen_bits must be 16 or 32");
  }
  const bool bf16 = screen_bits == 16;
  const size_t elem = bf16 ? 2 : 4;
  const Shape s{xd[0], cd[0], xd[1]};
  const float* x = x_buf.typed_data();
  const float* codes = codes_buf.typed_data();
  int32_t* indices = out->typed_data();
  int32_t* stat = stats->typed_data();
  stat[0] = stat[1] = 0;
  if (s.n == 0) return ffi::Error::Success();
  block = std::min(block, s.k);
  const int64_t num_blocks = (s.k + block - 1) / block;
  const int64_t num_tiles = (s.n + rows - 1) / rows;
  const int64_t padded_k = num_blocks * block, padded_n = num_tiles * rows;

  // Per-call buffers (kept between calls, per calling thread).
  thread_local std::vector<char> b_mean, b_codes16, b_weights, b_sq, b_cn, b_x16, b_xsq, b_xn;
  try {
    Screen* screen = CachedScreen(rows, block, s.d, bf16);
    double* mean = Scratch<double>(b_mean, s.d);
    std::fill(mean, mean + s.d, 0.0);
#pragma omp parallel
    {
      std::vector<double> local(s.d, 0.0);
#pragma omp for schedule(static) nowait
      for (int64_t c = 0; c < s.k; ++c)
        for (int64_t i = 0; i < s.d; ++i) local[i] += codes[c * s.d + i];
#pragma omp critical
      for (int64_t i = 0; i < s.d; ++i) mean[i] += local[i];
    }
    std::vector<float> mu(s.d);
    for (int64_t i = 0; i < s.d; ++i) mu[i] = static_cast<float>(mean[i] / s.k);

    // Centred codes in the screen's dtype (zero padded to whole blocks), |c'|^2 and |c'|; the
    // same for the inputs (zero rows pad the last tile; their results are dropped).
    char* codes16 = Scratch<char>(b_codes16, padded_k * s.d * elem);
    float* sq = Scratch<float>(b_sq, padded_k);
    float* cn = Scratch<float>(b_cn, padded_k);
    Centre(codes, s.k, padded_k, s.d, mu.data(), bf16, codes16, sq, cn);
    char* x16 = Scratch<char>(b_x16, padded_n * s.d * elem);
    float* xsq = Scratch<float>(b_xsq, padded_n);
    float* xn = Scratch<float>(b_xn, padded_n);
    Centre(x, s.n, padded_n, s.d, mu.data(), bf16, x16, xsq, xn);
    // Each block of codes in the matmul's weights layout, once per call.
    const size_t wbytes = screen->pd.weights_desc().get_size();
    char* weights = Scratch<char>(b_weights, wbytes * num_blocks);
    {
      dnnl::stream stream(Engine());
      for (int64_t b = 0; b < num_blocks; ++b) {
        memory user(screen->user_weights, Engine(), codes16 + b * block * s.d * elem);
        memory prim(screen->pd.weights_desc(), Engine(), weights + b * wbytes);
        screen->to_weights.execute(stream, user, prim);
      }
      stream.wait();
    }

    const float rounding = bf16 ? 0x1p-7f + 0x1p-15f : 0.0f;  // of the operands
    const float eps = 1.25f * (rounding + 1.1f * static_cast<float>(s.d) * 0x1p-24f + 0x1p-21f);
    const float eta = 0x1p-20f;
    int32_t fallbacks = 0, most = 0;
#pragma omp parallel reduction(+ : fallbacks) reduction(max : most)
    {
      thread_local std::vector<char> b_dist, b_pad;
      float* dist = Scratch<float>(b_dist, rows * block);
      char* pad = Scratch<char>(b_pad, screen->pd.scratchpad_desc().get_size());
      dnnl::stream stream(Engine());
      memory dst_mem(screen->pd.dst_desc(), Engine(), dist);
      memory pad_mem(screen->pd.scratchpad_desc(), Engine(), pad);
      std::vector<float> upper(rows);
      std::vector<int32_t> keep;
      std::vector<std::vector<std::pair<float, int32_t>>> cands(rows);
      std::vector<char> overflow(rows);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < num_tiles; ++t) {
        const int64_t r0 = t * rows;
        const int64_t live = std::min(rows, s.n - r0);
        std::fill(upper.begin(), upper.end(), std::numeric_limits<float>::infinity());
        for (auto& c : cands) c.clear();
        std::fill(overflow.begin(), overflow.end(), 0);
        memory src_mem(screen->pd.src_desc(), Engine(), x16 + r0 * s.d * elem);
        for (int64_t b = 0; b < num_blocks; ++b) {
          memory wei_mem(screen->pd.weights_desc(), Engine(), weights + b * wbytes);
          screen->prim.execute(stream, {{DNNL_ARG_SRC, src_mem},
                                        {DNNL_ARG_WEIGHTS, wei_mem},
                                        {DNNL_ARG_DST, dst_mem},
                                        {DNNL_ARG_SCRATCHPAD, pad_mem}});
          stream.wait();
          const int64_t k0 = b * block;
          const int64_t width = std::min(block, s.k - k0);
          const float* bsq = sq + k0;
          const float* bcn = cn + k0;
          for (int64_t r = 0; r < live; ++r) {
            float* row = dist + r * block;
            const float two_eps_xn = 2.0f * eps * xn[r0 + r];
            // row[j] <- s_j - B_j (a lower bound); the running upper bound is min_j s_j + B_j.
            float up = upper[r];
#pragma omp simd reduction(min : up)
            for (int64_t j = 0; j < width; ++j) {
              const float sj = bsq[j] - 2.0f * row[j];
              const float bj = two_eps_xn * bcn[j] + eta * bsq[j];
              up = std::min(up, sj + bj);
              row[j] = sj - bj;
            }
            upper[r] = up;
            if (overflow[r]) continue;
            auto& list = cands[r];
            for (int64_t j = 0; j < width; ++j) {
              if (row[j] <= up) list.emplace_back(row[j], static_cast<int32_t>(k0 + j));
            }
            if (static_cast<int64_t>(list.size()) > max_candidates) {
              list.erase(std::remove_if(list.begin(), list.end(),
                                        [up](const auto& p) { return p.first > up; }),
                         list.end());
              if (static_cast<int64_t>(list.size()) > max_candidates) overflow[r] = 1;
            }
          }
        }
        for (int64_t r = 0; r < live; ++r) {
          const float* xr = x + (r0 + r) * s.d;
          if (overflow[r]) {
            indices[r0 + r] = Nearest(xr, codes, s.d, s.k, [](int64_t j) { return j; });
            ++fallbacks;
            continue;
          }
          keep.clear();  // the candidates that the final upper bound keeps, in index order
          for (const auto& p : cands[r])
            if (p.first <= upper[r]) keep.push_back(p.second);
          most = std::max(most, static_cast<int32_t>(keep.size()));
          indices[r0 + r] = Nearest(xr, codes, s.d, static_cast<int64_t>(keep.size()),
                                    [&keep](int64_t j) { return keep[j]; });
        }
      }
    }
    stat[0] = fallbacks;
    stat[1] = most;
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("nearest_code (oneDNN matmul): ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// 1 when oneDNN can create the bfloat16 screening matmul for (rows, block, d) here, else 0 with
// oneDNN's reason in `why` (at most why_len bytes).
extern "C" int VqNearestCodeSupported(int64_t rows, int64_t block, int64_t d, int screen_bits,
                                      char* why, int why_len) {
  try {
    CachedScreen(rows, block, d, screen_bits == 16);
  } catch (const dnnl::error& e) {
    if (why_len > 0) std::snprintf(why, why_len, "%s", e.what());
    return 0;
  }
  return 1;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VqNearestCode, NearestCodeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("max_candidates")
                                  .Attr<int64_t>("screen_bits"));
