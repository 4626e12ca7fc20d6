// oneDNN 2-D convolutions as XLA:CPU FFI custom calls: forward, backward data, backward weights.
//
// Why: XLA:CPU's kernel-gradient convolutions need NHWC operands transposed into other layouts
// first (about a third of the VQ-VAE step's non-conv time), and its strided input gradient is a
// slow dilated conv. oneDNN computes all three passes directly on NHWC activations and HWIO
// kernels, as PyTorch's CPU convolutions do. Built on first use by vq_jax/nets/onednn.py.
//
// Layouts: x [N, H, W, Ci], w [kh, kw, Ci, Co], y [N, Ho, Wo, Co]; float32 or bfloat16 (with
// float32 accumulation inside oneDNN). Attributes: strides (sh, sw) and padding (top, bottom,
// left, right). Primitives are created once per shape and cached; scratchpads live in per-thread
// buffers kept between calls, so concurrent calls on different XLA threads are safe.

#include <cstdint>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  memory::dims src, wei, dst, strides, pad_l, pad_r;
  memory::data_type dt;
  std::string key;
};

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
  if (x.element_type() == ffi::DataType::F32) {
    g->dt = memory::data_type::f32;
  } else if (x.element_type() == ffi::DataType::BF16) {
    g->dt = memory::data_type::bf16;
  } else {
    return ffi::Error::InvalidArgument("onednn conv: only float32 and bfloat16 are supported");
  }
  // oneDNN names dims in NCHW / OIHW order whatever the memory layout.
  g->src = {xd[0], xd[3], xd[1], xd[2]};
  g->wei = {wd[3], wd[2], wd[0], wd[1]};
  g->dst = {yd[0], yd[3], yd[1], yd[2]};
  g->strides = {strides[0], strides[1]};
  g->pad_l = {padding[0], padding[2]};
  g->pad_r = {padding[1], padding[3]};
  std::ostringstream key;
  for (const auto* dims : {&g->src, &g->wei, &g->dst, &g->strides, &g->pad_l, &g->pad_r}) {
    for (auto d : *dims) key << d << ',';
    key << ';';
  }
  key << static_cast<int>(g->dt);
  g->key = key.str();
  return ffi::Error::Success();
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      memory::desc(g.src, g.dt, tag::nhwc), memory::desc(g.wei, g.dt, tag::any),
      memory::desc(g.dst, g.dt, tag::nhwc), g.strides, g.pad_l, g.pad_r, UserScratchpad());
}

// A primitive that reads the user's HWIO weights (forward, backward data), with the reorder
// into the weights layout oneDNN chose for it.
template <typename PrimitiveDesc, typename Primitive>
struct ReadsWeights {
  PrimitiveDesc pd;
  Primitive prim;
  memory::desc user_wei;
  dnnl::reorder wei_to_prim;

  explicit ReadsWeights(const PrimitiveDesc& d, const Geometry& g)
      : pd(d),
        prim(d),
        user_wei(g.wei, g.dt, tag::hwio),
        wei_to_prim(dnnl::reorder::primitive_desc(Engine(), user_wei, Engine(),
                                                  d.weights_desc())) {}
};
using Forward =
    ReadsWeights<dnnl::convolution_forward::primitive_desc, dnnl::convolution_forward>;
using BackwardData = ReadsWeights<dnnl::convolution_backward_data::primitive_desc,
                                  dnnl::convolution_backward_data>;

struct BackwardWeights {
  dnnl::convolution_backward_weights::primitive_desc pd;
  dnnl::convolution_backward_weights prim;
  memory::desc user_wei;
  dnnl::reorder prim_to_wei;  // the primitive's weights layout -> user HWIO
};

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

Forward* MakeForward(const Geometry& g) { return new Forward(ForwardDesc(g), g); }

BackwardData* MakeBackwardData(const Geometry& g) {
  return new BackwardData(
      dnnl::convolution_backward_data::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, memory::desc(g.src, g.dt, tag::nhwc),
          memory::desc(g.wei, g.dt, tag::any), memory::desc(g.dst, g.dt, tag::nhwc), g.strides,
          g.pad_l, g.pad_r, ForwardDesc(g), UserScratchpad()),
      g);
}

BackwardWeights* MakeBackwardWeights(const Geometry& g) {
  dnnl::convolution_backward_weights::primitive_desc pd(
      Engine(), dnnl::algorithm::convolution_direct, memory::desc(g.src, g.dt, tag::nhwc),
      memory::desc(g.wei, g.dt, tag::any), memory::desc(g.dst, g.dt, tag::nhwc), g.strides,
      g.pad_l, g.pad_r, ForwardDesc(g), UserScratchpad());
  memory::desc user_wei(g.wei, g.dt, tag::hwio);
  return new BackwardWeights{
      pd, dnnl::convolution_backward_weights(pd), user_wei,
      dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), pd.diff_weights_desc(), Engine(),
                                                  user_wei))};
}

// Per-thread buffers for scratchpads and reordered weights, kept between calls: a fresh
// allocation per call would be mmapped and page-faulted afresh each time (large scratchpads).
enum Slot { kScratch = 0, kWeights = 1 };

memory Buffer(const memory::desc& desc, Slot slot) {
  thread_local std::vector<char> buffers[2];
  std::vector<char>& buf = buffers[slot];
  const size_t size = desc.get_size() + 64;
  if (buf.size() < size) buf.resize(size);
  // oneDNN wants 64-byte aligned memory
  void* ptr = buf.data() + (64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64;
  return memory(desc, Engine(), ptr);
}

memory Wrap(const memory::dims& dims, memory::data_type dt, tag t, void* data) {
  return memory(memory::desc(dims, dt, t), Engine(), data);
}

// out = the primitive applied to activation `in` and the user's weights `w` (both NHWC).
template <typename Entry>
void RunReadsWeights(Entry* e, const Geometry& g, int in_arg, const memory::dims& in_dims,
                     void* in, void* w, int out_arg, const memory::dims& out_dims, void* out) {
  dnnl::stream stream(Engine());
  memory user_w(e->user_wei, Engine(), w);
  memory prim_w = user_w;
  if (e->pd.weights_desc() != e->user_wei) {
    prim_w = Buffer(e->pd.weights_desc(), kWeights);
    e->wei_to_prim.execute(stream, user_w, prim_w);
  }
  e->prim.execute(stream, {{in_arg, Wrap(in_dims, g.dt, tag::nhwc, in)},
                           {DNNL_ARG_WEIGHTS, prim_w},
                           {out_arg, Wrap(out_dims, g.dt, tag::nhwc, out)},
                           {DNNL_ARG_SCRATCHPAD, Buffer(e->pd.scratchpad_desc(), kScratch)}});
  stream.wait();
}

ffi::Error ConvForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  Geometry g;
  if (auto err = MakeGeometry(x, w, *y, strides, padding, &g); err.failure()) return err;
  try {
    RunReadsWeights(Cached<Forward>(g.key, &MakeForward, g), g, DNNL_ARG_SRC, g.src,
                    x.untyped_data(), w.untyped_data(), DNNL_ARG_DST, g.dst, y->untyped_data());
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
    RunReadsWeights(Cached<BackwardData>(g.key, &MakeBackwardData, g), g, DNNL_ARG_DIFF_DST,
                    g.dst, dy.untyped_data(), w.untyped_data(), DNNL_ARG_DIFF_SRC, g.src,
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
    BackwardWeights* b = Cached<BackwardWeights>(g.key, &MakeBackwardWeights, g);
    dnnl::stream stream(Engine());
    memory user_dw(b->user_wei, Engine(), dw->untyped_data());
    memory prim_dw = user_dw;
    if (b->pd.diff_weights_desc() != b->user_wei) {
      prim_dw = Buffer(b->pd.diff_weights_desc(), kWeights);
    }
    memory scratch = Buffer(b->pd.scratchpad_desc(), kScratch);
    b->prim.execute(stream, {{DNNL_ARG_SRC, Wrap(g.src, g.dt, tag::nhwc, x.untyped_data())},
                             {DNNL_ARG_DIFF_DST, Wrap(g.dst, g.dt, tag::nhwc, dy.untyped_data())},
                             {DNNL_ARG_DIFF_WEIGHTS, prim_dw},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
    if (prim_dw != user_dw) b->prim_to_wei.execute(stream, prim_dw, user_dw);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv backward weights: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

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
