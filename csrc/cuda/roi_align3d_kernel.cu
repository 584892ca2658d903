// RoIAlign3D, CUDA kernels (TORCH_LIBRARY_IMPL(stssa, CUDA)).
//
// Forward: one thread per output element (k, c, t, ph, pw), one pass over the feature map, reading it
// through its strides (contiguous, channels_last_3d or any view: no copy). For channels_last_3d input
// the thread order puts c fastest, so a warp reads 32 consecutive channels of one pixel (coalesced);
// otherwise pw is fastest as in torchvision. Memory floor: every input element under a box read once
// plus the output written once; the bilinear taps are recomputed per thread (cheap ALU, no extra traffic).
//
// Backward, two kernels:
//  * atomic (default): one thread per grad_output element scatters into grad_input with atomicAdd,
//    accumulating in fp32 (fp64 for double) even for fp16/bf16 so that the many small additions do not
//    lose precision, then casts once;
//  * deterministic (torch.use_deterministic_algorithms(True)): one thread per grad_input element gathers,
//    in roi order, every sample that lands on its pixel. The samples of a box lie on a uniform grid, so
//    the ones that can touch a pixel form an index range computed in O(1) (roi::sample_range); the exact
//    weight is then recomputed with the same helper the forward uses. No atomics, fixed order.
// All index arithmetic is 64-bit: K*C*T*ph*pw and N*C*T*H*W can pass 2^31 at AVA-like sizes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "roi_align3d_common.h"

namespace stssa {
namespace {

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t total) {
  // grid-stride loops below: cap the grid, the loop covers the rest
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
}

struct Shape5 {
  int64_t N, C, T, H, W;
};

template <typename scalar_t, typename acc_t, bool kChannelsFastest>
__global__ void __launch_bounds__(kThreads, 1)
roi_align3d_forward_kernel(const scalar_t* __restrict__ input, Shape5 s, int64_t sN, int64_t sC, int64_t sT,
                           int64_t sH, int64_t sW, const acc_t* __restrict__ rois, int64_t K, bool per_frame,
                           acc_t spatial_scale, int ph_n, int pw_n, int sampling_ratio, bool aligned,
                           scalar_t* __restrict__ out) {
  const int64_t total = K * s.C * s.T * ph_n * pw_n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t k, c, t;
    int ph, pw;
    if (kChannelsFastest) {  // idx = (((k * T + t) * ph + ph_i) * pw + pw_i) * C + c
      int64_t r = idx;
      c = r % s.C; r /= s.C;
      pw = static_cast<int>(r % pw_n); r /= pw_n;
      ph = static_cast<int>(r % ph_n); r /= ph_n;
      t = r % s.T;
      k = r / s.T;
    } else {  // idx = (((k * C + c) * T + t) * ph + ph_i) * pw + pw_i: the output's own order
      int64_t r = idx;
      pw = static_cast<int>(r % pw_n); r /= pw_n;
      ph = static_cast<int>(r % ph_n); r /= ph_n;
      t = r % s.T; r /= s.T;
      c = r % s.C;
      k = r / s.C;
    }
    const int64_t o = (((k * s.C + c) * s.T + t) * ph_n + ph) * pw_n + pw;
    const acc_t* roi = rois + (per_frame ? (k * s.T + t) : k) * 5;
    const acc_t b = roi[0];
    if (!(b >= acc_t(0) && b < static_cast<acc_t>(s.N))) {  // unchecked input (e.g. under torch.compile)
      out[o] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
      continue;
    }
    const auto g = roi::roi_geometry<acc_t>(roi + 1, spatial_scale, ph_n, pw_n, sampling_ratio, aligned);
    const scalar_t* plane = input + static_cast<int64_t>(b) * sN + c * sC + t * sT;
    acc_t sum = 0;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const auto ay = roi::axis_weights(roi::sample_coord(g.start_h, g.bin_h, g.step_h, ph, iy), s.H);
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const auto ax = roi::axis_weights(roi::sample_coord(g.start_w, g.bin_w, g.step_w, pw, ix), s.W);
        const acc_t v1 = static_cast<acc_t>(plane[ay.lo * sH + ax.lo * sW]);
        const acc_t v2 = static_cast<acc_t>(plane[ay.lo * sH + ax.hi * sW]);
        const acc_t v3 = static_cast<acc_t>(plane[ay.hi * sH + ax.lo * sW]);
        const acc_t v4 = static_cast<acc_t>(plane[ay.hi * sH + ax.hi * sW]);
        sum += ay.w_lo * ax.w_lo * v1 + ay.w_lo * ax.w_hi * v2 + ay.w_hi * ax.w_lo * v3 + ay.w_hi * ax.w_hi * v4;
      }
    }
    out[o] = static_cast<scalar_t>(sum / g.count);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
roi_align3d_backward_atomic_kernel(const scalar_t* __restrict__ grad, int64_t gK, int64_t gC, int64_t gT,
                                   int64_t gH, int64_t gW, Shape5 s, const acc_t* __restrict__ rois, int64_t K,
                                   bool per_frame, acc_t spatial_scale, int ph_n, int pw_n, int sampling_ratio,
                                   bool aligned, acc_t* __restrict__ grad_in) {
  const int64_t total = K * s.C * s.T * ph_n * pw_n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = idx;
    const int pw = static_cast<int>(r % pw_n); r /= pw_n;
    const int ph = static_cast<int>(r % ph_n); r /= ph_n;
    const int64_t t = r % s.T; r /= s.T;
    const int64_t c = r % s.C;
    const int64_t k = r / s.C;
    const acc_t* roi = rois + (per_frame ? (k * s.T + t) : k) * 5;
    const acc_t b = roi[0];
    if (!(b >= acc_t(0) && b < static_cast<acc_t>(s.N))) continue;
    const auto g = roi::roi_geometry<acc_t>(roi + 1, spatial_scale, ph_n, pw_n, sampling_ratio, aligned);
    const acc_t gv = static_cast<acc_t>(grad[k * gK + c * gC + t * gT + ph * gH + pw * gW]) / g.count;
    if (gv == acc_t(0)) continue;
    acc_t* plane = grad_in + ((static_cast<int64_t>(b) * s.C + c) * s.T + t) * s.H * s.W;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const auto ay = roi::axis_weights(roi::sample_coord(g.start_h, g.bin_h, g.step_h, ph, iy), s.H);
      if (ay.w_lo == acc_t(0) && ay.w_hi == acc_t(0)) continue;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const auto ax = roi::axis_weights(roi::sample_coord(g.start_w, g.bin_w, g.step_w, pw, ix), s.W);
        if (ax.w_lo == acc_t(0) && ax.w_hi == acc_t(0)) continue;
        atomicAdd(plane + ay.lo * s.W + ax.lo, gv * ay.w_lo * ax.w_lo);
        atomicAdd(plane + ay.lo * s.W + ax.hi, gv * ay.w_lo * ax.w_hi);
        atomicAdd(plane + ay.hi * s.W + ax.lo, gv * ay.w_hi * ax.w_lo);
        atomicAdd(plane + ay.hi * s.W + ax.hi, gv * ay.w_hi * ax.w_hi);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
roi_align3d_backward_gather_kernel(const scalar_t* __restrict__ grad, int64_t gK, int64_t gC, int64_t gT,
                                   int64_t gH, int64_t gW, Shape5 s, const acc_t* __restrict__ rois, int64_t K,
                                   bool per_frame, acc_t spatial_scale, int ph_n, int pw_n, int sampling_ratio,
                                   bool aligned, scalar_t* __restrict__ grad_in) {
  const int64_t total = s.N * s.C * s.T * s.H * s.W;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = idx;
    const int64_t x = r % s.W; r /= s.W;
    const int64_t y = r % s.H; r /= s.H;
    const int64_t t = r % s.T; r /= s.T;
    const int64_t c = r % s.C;
    const int64_t n = r / s.C;
    acc_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* roi = rois + (per_frame ? (k * s.T + t) : k) * 5;
      if (!(roi[0] >= acc_t(0) && roi[0] < static_cast<acc_t>(s.N)) || static_cast<int64_t>(roi[0]) != n) continue;
      const auto g = roi::roi_geometry<acc_t>(roi + 1, spatial_scale, ph_n, pw_n, sampling_ratio, aligned);
      int y0, y1, x0, x1;
      if (!roi::sample_range(g.start_h, g.bin_h, g.step_h, g.grid_h, ph_n, y, s.H, &y0, &y1)) continue;
      if (!roi::sample_range(g.start_w, g.bin_w, g.step_w, g.grid_w, pw_n, x, s.W, &x0, &x1)) continue;
      const scalar_t* go = grad + k * gK + c * gC + t * gT;
      acc_t acc = 0;
      for (int sy = y0; sy <= y1; ++sy) {
        const int ph = sy / g.grid_h;
        const acc_t wy = roi::weight_on_pixel(roi::sample_coord(g.start_h, g.bin_h, g.step_h, ph, sy - ph * g.grid_h), y, s.H);
        if (wy == acc_t(0)) continue;
        for (int sx = x0; sx <= x1; ++sx) {
          const int pw = sx / g.grid_w;
          const acc_t wx = roi::weight_on_pixel(roi::sample_coord(g.start_w, g.bin_w, g.step_w, pw, sx - pw * g.grid_w), x, s.W);
          if (wx == acc_t(0)) continue;
          acc += wy * wx * static_cast<acc_t>(go[ph * gH + pw * gW]);
        }
      }
      sum += acc / g.count;
    }
    grad_in[idx] = static_cast<scalar_t>(sum);
  }
}

void check_cuda_args(const at::Tensor& a, const char* an, const at::Tensor& rois) {
  TORCH_CHECK(a.is_cuda(), "roi_align3d: ", an, " must be a CUDA tensor here");
  TORCH_CHECK(rois.device() == a.device(), "roi_align3d: rois must be on ", a.device(), ", got ", rois.device());
}

at::Tensor rois_in_acc_type(const at::Tensor& rois, at::ScalarType scalar) {
  return rois.to(scalar == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

at::Tensor roi_align3d_forward_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                    int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                    bool aligned) {
  check_cuda_args(input, "input", rois);
  TORCH_CHECK(input.dim() == 5, "roi_align3d: input must be [N, C, T, H, W], got ", input.dim(), " dims");
  TORCH_CHECK((rois.dim() == 2 && rois.size(1) == 5) ||
                  (rois.dim() == 3 && rois.size(1) == input.size(2) && rois.size(2) == 5),
              "roi_align3d: rois must be [K, 5] or [K, T, 5] with T = input.size(2), got ", rois.sizes());
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "roi_align3d: output_size must be positive");
  TORCH_CHECK(rois.size(0) == 0 || (input.size(3) > 0 && input.size(4) > 0),
              "roi_align3d: input height and width must be positive when there are boxes");
  c10::cuda::CUDAGuard guard(input.device());
  auto output = at::empty({rois.size(0), input.size(1), input.size(2), pooled_height, pooled_width},
                          input.options().memory_format(at::MemoryFormat::Contiguous));
  if (output.numel() == 0) return output;
  const auto r = rois_in_acc_type(rois, input.scalar_type());
  const Shape5 s{input.size(0), input.size(1), input.size(2), input.size(3), input.size(4)};
  // channels_last_3d (C has the smallest stride): make consecutive threads walk channels.
  const bool channels_fastest = input.stride(1) == 1 && input.size(1) > 1;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align3d_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = channels_fastest ? roi_align3d_forward_kernel<scalar_t, acc_t, true>
                                   : roi_align3d_forward_kernel<scalar_t, acc_t, false>;
    launch<<<num_blocks(output.numel()), kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), s, input.stride(0), input.stride(1), input.stride(2), input.stride(3),
        input.stride(4), r.const_data_ptr<acc_t>(), rois.size(0), rois.dim() == 3,
        static_cast<acc_t>(spatial_scale), static_cast<int>(pooled_height), static_cast<int>(pooled_width),
        static_cast<int>(sampling_ratio), aligned, output.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

at::Tensor roi_align3d_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                     int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                     int64_t channels, int64_t time, int64_t height, int64_t width,
                                     int64_t sampling_ratio, bool aligned) {
  check_cuda_args(grad, "grad", rois);
  TORCH_CHECK(grad.dim() == 5 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == time && grad.size(3) == pooled_height && grad.size(4) == pooled_width,
              "_roi_align3d_backward: grad must be [K, C, T, ph, pw], got ", grad.sizes());
  c10::cuda::CUDAGuard guard(grad.device());
  const Shape5 s{batch_size, channels, time, height, width};
  const auto opts = grad.options().memory_format(at::MemoryFormat::Contiguous);
  if (batch_size * channels * time * height * width == 0 || grad.numel() == 0)
    return at::zeros({batch_size, channels, time, height, width}, opts);
  const auto r = rois_in_acc_type(rois, grad.scalar_type());
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align3d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (deterministic) {
      result = at::empty({batch_size, channels, time, height, width}, opts);
      roi_align3d_backward_gather_kernel<scalar_t, acc_t><<<num_blocks(result.numel()), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
          grad.stride(4), s, r.const_data_ptr<acc_t>(), rois.size(0), rois.dim() == 3,
          static_cast<acc_t>(spatial_scale), static_cast<int>(pooled_height), static_cast<int>(pooled_width),
          static_cast<int>(sampling_ratio), aligned, result.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      auto acc = at::zeros({batch_size, channels, time, height, width}, opts.dtype(r.scalar_type()));
      roi_align3d_backward_atomic_kernel<scalar_t, acc_t><<<num_blocks(grad.numel()), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
          grad.stride(4), s, r.const_data_ptr<acc_t>(), rois.size(0), rois.dim() == 3,
          static_cast<acc_t>(spatial_scale), static_cast<int>(pooled_height), static_cast<int>(pooled_width),
          static_cast<int>(sampling_ratio), aligned, acc.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      result = acc.scalar_type() == grad.scalar_type() ? acc : acc.to(grad.scalar_type());
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(stssa, CUDA, m) {
  m.impl("roi_align3d", &roi_align3d_forward_cuda);
  m.impl("_roi_align3d_backward", &roi_align3d_backward_cuda);
}

}  // namespace stssa
