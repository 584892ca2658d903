// Every schema of the C++-implemented ops, in one place (torchvision's csrc/ops pattern), written against
// the LibTorch stable ABI (torch/csrc/stable, torch/headeronly) and compiled with
// TORCH_TARGET_VERSION = 2.10: one binary loads under every torch >= 2.10.
// Backends register kernels with STABLE_TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/; the fake (meta)
// kernels and autograd formulas are registered from Python (stssa_kernels/ops/).
#include <torch/csrc/stable/library.h>

#include <string>

#ifdef STSSA_PYTHON_MODULE  // set by setup.py; the CMake build (C++ users) has no Python
#include <Python.h>         // Py_LIMITED_API is defined by setup.py: the module is abi3
extern "C" {
// `import stssa_kernels._C` loads this shared library, which runs the static registrations below.
// The module itself exposes nothing: everything is reached through torch.ops.stssa.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

namespace stssa {
namespace {

std::string build_info() {
#ifdef STSSA_WITH_CUDA
  return "cuda=1 abi=stable-2.10";
#else
  return "cuda=0 abi=stable-2.10";
#endif
}

}  // namespace

STABLE_TORCH_LIBRARY(stssa, m) {
  // input [N, C, T, H, W]; rois [K, 5] (one box for every frame) or [K, T, 5] (a box per frame),
  // rows (batch_index, x1, y1, x2, y2) in input-image coordinates -> [K, C, T, pooled_h, pooled_w],
  // channels_last_3d when input is (then the channel vector of every bin is contiguous), else contiguous.
  m.def("roi_align3d(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  // grad [K, C, T, ph, pw] -> grad_input [batch_size, C, T, height, width] (channels_last_3d when
  // channels_last). deterministic: the CUDA kernel gathers without atomics (Python passes
  // torch.are_deterministic_algorithms_enabled(), which the stable ABI cannot read); the CPU kernel is
  // always deterministic.
  m.def("_roi_align3d_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt time, SymInt height, SymInt width, "
        "int sampling_ratio, bool aligned, bool deterministic=False, bool channels_last=False) -> Tensor");
  m.def("_build_info() -> str");
}

STABLE_TORCH_LIBRARY_IMPL(stssa, CompositeExplicitAutograd, m) {
  m.impl("_build_info", TORCH_BOX(&build_info));
}

}  // namespace stssa
