// The one oneDNN CPU engine that the native kernels (onednn_conv.cc, nearest_code.cc) share.
#pragma once

#include "oneapi/dnnl/dnnl.hpp"

namespace vq_jax {

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

}  // namespace vq_jax
