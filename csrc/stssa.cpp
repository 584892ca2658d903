// Every schema of the C++-implemented ops, in one place (torchvision's csrc/ops pattern).
// Backends register kernels with TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/; the fake (meta)
// kernels and autograd formulas are registered from Python (stssa_kernels/ops/).
#include <torch/library.h>

#include <string>

#ifdef STSSA_PYTHON_MODULE  // set by setup.py; the CMake build (C++ users) has no Python
#include <Python.h>
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

static std::string build_info() {
#ifdef STSSA_WITH_CUDA
  return "cuda=1";
#else
  return "cuda=0";
#endif
}

TORCH_LIBRARY(stssa, m) {
  // input [N, C, T, H, W]; rois [K, 5] (one box for every frame) or [K, T, 5] (a box per frame),
  // rows (batch_index, x1, y1, x2, y2) in input-image coordinates -> [K, C, T, pooled_h, pooled_w].
  m.def("roi_align3d(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  // grad [K, C, T, ph, pw] -> grad_input [batch_size, C, T, height, width]. Deterministic (no atomics)
  // when torch.use_deterministic_algorithms(True) is set.
  m.def("_roi_align3d_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt time, SymInt height, SymInt width, "
        "int sampling_ratio, bool aligned) -> Tensor");
  m.def("_build_info() -> str", &build_info);
}

}  // namespace stssa
