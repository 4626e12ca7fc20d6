// oneDNN 2-D convolutions as XLA:CPU FFI custom calls: forward, backward data, backward weights.
//
// Why: XLA:CPU's kernel-gradient convolutions need NHWC operands transposed into other layouts
// first (about a third of the VQ-VAE step's non-conv time), and its strided input gradient is a
// slow dilated conv. oneDNN computes all three passes directly on NHWC activations and HWIO
// kernels, as PyTorch's CPU convolutions do. Built by vq_jax/cpu/native.py (vq_jax.cpu.enable).
//
// Layouts: x [N, H, W, Ci], w [kh, kw, Ci, Co], y [N, Ho, Wo, Co]; float32 or bfloat16 (with
// float32 accumulation inside oneDNN). Attributes: strides (sh, sw) and padding (top, bottom,
// left, right). Primitives are created once per shape and cached; scratchpads and reordered
// arguments live in per-thread buffers kept between calls, so concurrent calls on different XLA threads are safe.
//
// Not every CPU has kernels for every case (oneDNN 3.2 has no bfloat16 convolutions on AVX2-only
// CPUs): VqOnednnConvSupported, a plain C function that Python calls through ctypes before it
// emits a custom call, creates the three primitives of one case and says whether it could.

#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <sstream>
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

struct Geometry {
  memory::dims src, wei, dst, strides, pad_l, pad_r;
  memory::data_type dt;
  std::string key;
};

// x [N, H, W, Ci], w [kh, kw, Ci, Co], y [N, Ho, Wo, Co]; padding (top, bottom, left, right).
Geometry MakeGeometry(const int64_t* xd, const int64_t* wd, const int64_t* yd,
                      const int64_t* strides, const int64_t* padding, memory::data_type dt) {
  Geometry g;
  g.dt = dt;
  // oneDNN names dims in NCHW / OIHW order whatever the memory layout.
  g.src = {xd[0], xd[3], xd[1], xd[2]};
  g.wei = {wd[3], wd[2], wd[0], wd[1]};
  g.dst = {yd[0], yd[3], yd[1], yd[2]};
  g.strides = {strides[0], strides[1]};
  g.pad_l = {padding[0], padding[2]};
  g.pad_r = {padding[1], padding[3]};
  std::ostringstream key;
  for (const auto* dims : {&g.src, &g.wei, &g.dst, &g.strides, &g.pad_l, &g.pad_r}) {
    for (auto d : *dims) key << d << ',';
    key << ';';
  }
  key << static_cast<int>(g.dt);
  g.key = key.str();
  return g;
}

ffi::Error MakeGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w,
                        const ffi::AnyBuffer& y, ffi::Span<const int64_t> strides,
                        ffi::Span<const int64_t> padding, Geometry* g) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || strides.size() != 2 ||
      padding.size() != 4) {
    return ffi::Error::InvalidArgument(
        "onednn conv: expected NHWC x, HWIO w, NHWC y, 2 strides and 4 paddings");
  }
  if (x.element_type() != w.element_type() || x.element_type() != y.element_type()) {
    return ffi::Error::InvalidArgument("onednn conv: x, w and y must share one dtype");
  }
  memory::data_type dt;
  if (x.element_type() == ffi::DataType::F32) {
    dt = memory::data_type::f32;
  } else if (x.element_type() == ffi::DataType::BF16) {
    dt = memory::data_type::bf16;
  } else {
    return ffi::Error::InvalidArgument("onednn conv: only float32 and bfloat16 are supported");
  }
  *g = MakeGeometry(xd.begin(), wd.begin(), yd.begin(), strides.begin(), padding.begin(), dt);
  return ffi::Error::Success();
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

memory::desc UserActivation(const memory::dims& dims, const Geometry& g) {
  return memory::desc(dims, g.dt, tag::nhwc);
}

memory::desc UserWeights(const Geometry& g) { return memory::desc(g.wei, g.dt, tag::hwio); }

// Activations stay NHWC for the primitives too. (oneDNN's blocked layout, nChw8c, with reorders
// from and to NHWC in each call, was tried on AVX2: its kernels gained less than the reorders
// cost; BENCHMARKS.md section 6, attempt 21.)
memory::desc PrimitiveActivation(const memory::dims& dims, const Geometry& g) {
  return UserActivation(dims, g);
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      PrimitiveActivation(g.src, g), memory::desc(g.wei, g.dt, tag::any),
      PrimitiveActivation(g.dst, g), g.strides, g.pad_l, g.pad_r, UserScratchpad());
}

// One argument of a primitive: the user's buffer layout and the primitive's, with the reorder
// between them when they differ (user -> primitive for inputs, primitive -> user for outputs).
struct Port {
  int arg;
  memory::desc user, prim;
  dnnl::reorder reorder;

  Port(int arg_, const memory::desc& user_, const memory::desc& prim_, bool input)
      : arg(arg_), user(user_), prim(prim_) {
    if (user == prim) return;
    reorder = input
        ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user, Engine(), prim))
        : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), prim, Engine(), user));
  }
  bool Same() const { return user == prim; }
};

// A convolution primitive (forward, backward data or backward weights) reading two user buffers
// and writing one.
template <typename Primitive>
struct Conv {
  typename Primitive::primitive_desc pd;
  Primitive prim;
  Port in0, in1, out;
};
using Forward = Conv<dnnl::convolution_forward>;
using BackwardData = Conv<dnnl::convolution_backward_data>;
using BackwardWeights = Conv<dnnl::convolution_backward_weights>;

template <typename T>
T* Cached(const std::string& key, T* (*make)(const Geometry&), const Geometry& g) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<T>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second.get();
  T* entry = make(g);
  cache.emplace(key, std::unique_ptr<T>(entry));
  return entry;
}

Forward* MakeForward(const Geometry& g) {
  const auto pd = ForwardDesc(g);
  return new Forward{pd, dnnl::convolution_forward(pd),
                     Port(DNNL_ARG_SRC, UserActivation(g.src, g), pd.src_desc(), true),
                     Port(DNNL_ARG_WEIGHTS, UserWeights(g), pd.weights_desc(), true),
                     Port(DNNL_ARG_DST, UserActivation(g.dst, g), pd.dst_desc(), false)};
}

// Backward data and backward weights take the same arguments: (diff_)src, (diff_)weights and
// diff_dst descriptors, the geometry, and the forward primitive as a hint.
template <typename PrimitiveDesc>
PrimitiveDesc BackwardDesc(const Geometry& g) {
  return PrimitiveDesc(Engine(), dnnl::algorithm::convolution_direct,
                       PrimitiveActivation(g.src, g), memory::desc(g.wei, g.dt, tag::any),
                       PrimitiveActivation(g.dst, g), g.strides, g.pad_l, g.pad_r, ForwardDesc(g),
                       UserScratchpad());
}

BackwardData* MakeBackwardData(const Geometry& g) {
  const auto pd = BackwardDesc<dnnl::convolution_backward_data::primitive_desc>(g);
  return new BackwardData{
      pd, dnnl::convolution_backward_data(pd),
      Port(DNNL_ARG_DIFF_DST, UserActivation(g.dst, g), pd.diff_dst_desc(), true),
      Port(DNNL_ARG_WEIGHTS, UserWeights(g), pd.weights_desc(), true),
      Port(DNNL_ARG_DIFF_SRC, UserActivation(g.src, g), pd.diff_src_desc(), false)};
}

BackwardWeights* MakeBackwardWeights(const Geometry& g) {
  const auto pd = BackwardDesc<dnnl::convolution_backward_weights::primitive_desc>(g);
  return new BackwardWeights{
      pd, dnnl::convolution_backward_weights(pd),
      Port(DNNL_ARG_SRC, UserActivation(g.src, g), pd.src_desc(), true),
      Port(DNNL_ARG_DIFF_DST, UserActivation(g.dst, g), pd.diff_dst_desc(), true),
      Port(DNNL_ARG_DIFF_WEIGHTS, UserWeights(g), pd.diff_weights_desc(), false)};
}

// Per-thread buffers for scratchpads and reordered arguments, kept between calls: a fresh
// allocation per call would be mmapped and page-faulted afresh each time (large scratchpads).
enum Slot { kScratch = 0, kIn0 = 1, kIn1 = 2, kOut = 3, kNumSlots = 4 };

memory Buffer(const memory::desc& desc, Slot slot) {
  thread_local std::vector<char> buffers[kNumSlots];
  std::vector<char>& buf = buffers[slot];
  const size_t size = desc.get_size() + 64;
  if (buf.size() < size) buf.resize(size);
  // oneDNN wants 64-byte aligned memory
  void* ptr = buf.data() + (64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64;
  return memory(desc, Engine(), ptr);
}

// What the primitive reads for an input port: the user's buffer, or a reordered copy of it.
memory Input(const Port& p, void* data, Slot slot, const dnnl::stream& stream) {
  memory user(p.user, Engine(), data);
  if (p.Same()) return user;
  memory prim = Buffer(p.prim, slot);
  p.reorder.execute(stream, user, prim);
  return prim;
}

// out = the primitive applied to in0 and in1 (user buffers in, user buffer out).
template <typename Primitive>
void Run(const Conv<Primitive>& c, void* in0, void* in1, void* out) {
  dnnl::stream stream(Engine());
  memory a = Input(c.in0, in0, kIn0, stream);
  memory b = Input(c.in1, in1, kIn1, stream);
  memory user_out(c.out.user, Engine(), out);
  memory prim_out = c.out.Same() ? user_out : Buffer(c.out.prim, kOut);
  c.prim.execute(stream, {{c.in0.arg, a},
                          {c.in1.arg, b},
                          {c.out.arg, prim_out},
                          {DNNL_ARG_SCRATCHPAD, Buffer(c.pd.scratchpad_desc(), kScratch)}});
  if (!c.out.Same()) c.out.reorder.execute(stream, prim_out, user_out);
  stream.wait();
}

ffi::Error ConvForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  Geometry g;
  if (auto err = MakeGeometry(x, w, *y, strides, padding, &g); err.failure()) return err;
  try {
    Run(*Cached<Forward>(g.key, &MakeForward, g), x.untyped_data(), w.untyped_data(),
        y->untyped_data());
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv forward: ") + e.what());
  }
  return ffi::Error::Success();
}

// dx = d(sum(conv(x, w) * dy)) / dx (x's shape is dx's).
ffi::Error ConvBackwardDataImpl(ffi::AnyBuffer dy, ffi::AnyBuffer w,
                                ffi::Result<ffi::AnyBuffer> dx, ffi::Span<const int64_t> strides,
                                ffi::Span<const int64_t> padding) {
  Geometry g;
  if (auto err = MakeGeometry(*dx, w, dy, strides, padding, &g); err.failure()) return err;
  try {
    Run(*Cached<BackwardData>(g.key, &MakeBackwardData, g), dy.untyped_data(), w.untyped_data(),
        dx->untyped_data());
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv backward data: ") + e.what());
  }
  return ffi::Error::Success();
}

// dw = d(sum(conv(x, w) * dy)) / dw.
ffi::Error ConvBackwardWeightsImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                                   ffi::Result<ffi::AnyBuffer> dw,
                                   ffi::Span<const int64_t> strides,
                                   ffi::Span<const int64_t> padding) {
  Geometry g;
  if (auto err = MakeGeometry(x, *dw, dy, strides, padding, &g); err.failure()) return err;
  try {
    Run(*Cached<BackwardWeights>(g.key, &MakeBackwardWeights, g), x.untyped_data(),
        dy.untyped_data(), dw->untyped_data());
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv backward weights: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// 1 when oneDNN can create the forward, backward-data and backward-weights primitives of this
// case on this CPU (they are then cached for the custom calls), else 0 with oneDNN's reason in
// `why` (at most why_len bytes). dtype: 0 float32, 1 bfloat16; dims as in the custom calls.
extern "C" int VqOnednnConvSupported(int dtype, const int64_t* x, const int64_t* w,
                                     const int64_t* y, const int64_t* strides,
                                     const int64_t* padding, char* why, int why_len) {
  const auto dt = dtype == 1 ? memory::data_type::bf16 : memory::data_type::f32;
  const Geometry g = MakeGeometry(x, w, y, strides, padding, dt);
  try {
    Cached<Forward>(g.key, &MakeForward, g);
    Cached<BackwardData>(g.key, &MakeBackwardData, g);
    Cached<BackwardWeights>(g.key, &MakeBackwardWeights, g);
  } catch (const dnnl::error& e) {
    if (why_len > 0) std::snprintf(why, why_len, "%s", e.what());
    return 0;
  }
  return 1;
}

// The instruction set oneDNN uses here (a dnnl_cpu_isa_t value; ONEDNN_MAX_CPU_ISA caps it).
extern "C" int VqOnednnCpuIsa() { return static_cast<int>(dnnl::get_effective_cpu_isa()); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(VqOnednnConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VqOnednnConvBackwardData, ConvBackwardDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VqOnednnConvBackwardWeights, ConvBackwardWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding"));
