// RoIAlign3D, CUDA kernels (STABLE_TORCH_LIBRARY_IMPL(stssa, CUDA)), on the LibTorch stable ABI: only the
// stable C shim and the CUDA runtime are used (no ATen/c10 CUDA headers), so the binary loads under any
// torch >= 2.10 -- and under a CPU-only torch, where these kernels are simply never called.
//
// Forward: one thread per output element, one pass over the feature map, read through its strides
// (contiguous, channels_last_3d or any view: no copy). For channels_last_3d input the thread order puts c
// fastest: a warp reads 32 consecutive channels of one pixel and, since the output is then channels_last_3d
// too, writes 32 consecutive values (both coalesced); the 32 threads share one (box, frame, bin), so the
// sample positions and weights they compute are the same (ALU only, no extra memory traffic). Otherwise
// pw is fastest as in torchvision and the output is contiguous.
//
// Backward, two kernels:
//  * atomic (default): one thread per grad_output element scatters into grad_input with atomicAdd,
//    accumulating in fp32 (fp64 for double) even for fp16/bf16, then casts once;
//  * deterministic (Python passes torch.are_deterministic_algorithms_enabled()): boxes are first bucketed
//    by batch index and 2-D pixel tile (roi::fill_bucket, one thread per bucket, roi order); then one thread
//    per grad_input element gathers from the boxes of its bucket only (roi::gather_pixel). Both helpers are
//    __host__ __device__ and run on the host in tests/cpp against the CPU scatter. No atomics, fixed order.
// All index arithmetic is 64-bit: K*C*T*ph*pw and N*C*T*H*W can pass 2^31 at AVA-like sizes.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "roi_align3d_common.h"
#include "stable_utils.h"

namespace stssa {
namespace cuda {
namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

constexpr int kThreads = 256;

#define STSSA_CUDA_CHECK(expr)                                                                  \
  do {                                                                                          \
    const cudaError_t err_ = (expr);                                                            \
    STD_TORCH_CHECK(err_ == cudaSuccess, "roi_align3d CUDA error: ", cudaGetErrorString(err_)); \
  } while (0)



int64_t num_blocks(int64_t total, int device) {
  // grid-stride loops below: cap the grid, the loop covers the rest
  int sms = 0;
  STSSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 32));
}

// torch's current CUDA stream. The stable C shim of torch 2.10 has it only in libtorch_cuda
// (aoti_torch_get_current_cuda_stream); linking that library would stop the module from loading under a
// CPU-only torch, so the symbol is looked up in the already-loaded library on first use.
cudaStream_t current_stream(int32_t device) {
  using Fn = AOTITorchError (*)(int32_t, void**);
  static const Fn fn = []() -> Fn {
    void* lib = dlopen("libtorch_cuda.so", RTLD_NOLOAD | RTLD_LAZY);
    void* sym = lib ? dlsym(lib, "aoti_torch_get_current_cuda_stream") : nullptr;
    if (!sym) sym = dlsym(RTLD_DEFAULT, "aoti_torch_get_current_cuda_stream");
    return reinterpret_cast<Fn>(sym);
  }();
  STD_TORCH_CHECK(fn != nullptr, "roi_align3d: this torch has no CUDA support loaded (libtorch_cuda)");
  void* stream = nullptr;
  STD_TORCH_CHECK(fn(device, &stream) == AOTI_TORCH_SUCCESS, "roi_align3d: cannot get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

struct Shape5 {
  int64_t N, C, T, H, W;
};


template <typename scalar_t, typename acc_t, bool kChannelsFastest>
__global__ void __launch_bounds__(kThreads, 1)
roi_align3d_forward_kernel(const scalar_t* __restrict__ input, Shape5 s, Strides5 si, const acc_t* __restrict__ rois,
                           int64_t K, bool per_frame, acc_t spatial_scale, int ph_n, int pw_n, int sampling_ratio,
                           bool aligned, Strides5 so, scalar_t* __restrict__ out) {
  const int64_t total = K * s.C * s.T * ph_n * pw_n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t k, c, t;
    int ph, pw;
    int64_t r = idx;
    if (kChannelsFastest) {  // idx = (((k * T + t) * ph + ph_i) * pw + pw_i) * C + c
      c = r % s.C; r /= s.C;
      pw = static_cast<int>(r % pw_n); r /= pw_n;
      ph = static_cast<int>(r % ph_n); r /= ph_n;
      t = r % s.T;
      k = r / s.T;
    } else {  // idx = (((k * C + c) * T + t) * ph + ph_i) * pw + pw_i
      pw = static_cast<int>(r % pw_n); r /= pw_n;
      ph = static_cast<int>(r % ph_n); r /= ph_n;
      t = r % s.T; r /= s.T;
      c = r % s.C;
      k = r / s.C;
    }
    const int64_t o = k * so.s0 + c * so.s1 + t * so.s2 + ph * so.s3 + pw * so.s4;
    const acc_t* roi = rois + (per_frame ? (k * s.T + t) : k) * 5;
    const acc_t b = roi[0];
    if (!(b >= acc_t(0) && b < static_cast<acc_t>(s.N))) {  // unchecked input (e.g. under torch.compile)
      out[o] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
      continue;
    }
    const auto g = roi::roi_geometry<acc_t>(roi + 1, spatial_scale, ph_n, pw_n, sampling_ratio, aligned);
    const scalar_t* plane = input + static_cast<int64_t>(b) * si.s0 + c * si.s1 + t * si.s2;
    acc_t sum = 0;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const auto ay = roi::axis_weights(roi::sample_coord(g.start_h, g.bin_h, g.grid_h, ph, iy), s.H);
      if (ay.w_lo == acc_t(0) && ay.w_hi == acc_t(0)) continue;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const auto ax = roi::axis_weights(roi::sample_coord(g.start_w, g.bin_w, g.grid_w, pw, ix), s.W);
        const acc_t v1 = static_cast<acc_t>(plane[ay.lo * si.s3 + ax.lo * si.s4]);
        const acc_t v2 = static_cast<acc_t>(plane[ay.lo * si.s3 + ax.hi * si.s4]);
        const acc_t v3 = static_cast<acc_t>(plane[ay.hi * si.s3 + ax.lo * si.s4]);
        const acc_t v4 = static_cast<acc_t>(plane[ay.hi * si.s3 + ax.hi * si.s4]);
        sum += ay.w_lo * ax.w_lo * v1 + ay.w_lo * ax.w_hi * v2 + ay.w_hi * ax.w_lo * v3 + ay.w_hi * ax.w_hi * v4;
      }
    }
    out[o] = static_cast<scalar_t>(sum / g.count);
  }
}

// grad_in: contiguous [N, C, T, H, W] accumulator in acc_t.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
roi_align3d_backward_atomic_kernel(const scalar_t* __restrict__ grad, Strides5 sg, Shape5 s,
                                   const acc_t* __restrict__ rois, int64_t K, bool per_frame, acc_t spatial_scale,
                                   int ph_n, int pw_n, int sampling_ratio, bool aligned, acc_t* __restrict__ grad_in) {
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
    const acc_t gv = static_cast<acc_t>(grad[k * sg.s0 + c * sg.s1 + t * sg.s2 + ph * sg.s3 + pw * sg.s4]) / g.count;
    if (gv == acc_t(0)) continue;
    acc_t* plane = grad_in + ((static_cast<int64_t>(b) * s.C + c) * s.T + t) * s.H * s.W;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const auto ay = roi::axis_weights(roi::sample_coord(g.start_h, g.bin_h, g.grid_h, ph, iy), s.H);
      if (ay.w_lo == acc_t(0) && ay.w_hi == acc_t(0)) continue;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const auto ax = roi::axis_weights(roi::sample_coord(g.start_w, g.bin_w, g.grid_w, pw, ix), s.W);
        if (ax.w_lo == acc_t(0) && ax.w_hi == acc_t(0)) continue;
        atomicAdd(plane + ay.lo * s.W + ax.lo, gv * ay.w_lo * ax.w_lo);
        atomicAdd(plane + ay.lo * s.W + ax.hi, gv * ay.w_lo * ax.w_hi);
        atomicAdd(plane + ay.hi * s.W + ax.lo, gv * ay.w_hi * ax.w_lo);
        atomicAdd(plane + ay.hi * s.W + ax.hi, gv * ay.w_hi * ax.w_hi);
      }
    }
  }
}

// One thread per bucket (n, tb, tile): the boxes that can touch the tile, in roi order.
template <typename acc_t>
__global__ void roi_align3d_bucket_kernel(const acc_t* __restrict__ rois, int64_t K, int64_t n_tb, roi::TileGrid tg,
                                          Shape5 s, acc_t spatial_scale, int ph_n, int pw_n, int sampling_ratio,
                                          bool aligned, int32_t* __restrict__ lists, int32_t* __restrict__ counts) {
  const int64_t tiles = tg.ty * tg.tx;
  const int64_t total = s.N * n_tb * tiles;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < total;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tile = b % tiles;
    const int64_t tb = (b / tiles) % n_tb;
    const int64_t n = b / (tiles * n_tb);
    counts[b] = roi::fill_bucket(rois, K, n_tb, n, tb, tile, tg, s.N, s.H, s.W, spatial_scale, ph_n, pw_n,
                                 sampling_ratio, aligned, lists + b * K);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
roi_align3d_backward_gather_kernel(const scalar_t* __restrict__ grad, Strides5 sg, Shape5 s,
                                   const acc_t* __restrict__ rois, int64_t K, bool per_frame, roi::TileGrid tg,
                                   const int32_t* __restrict__ lists, const int32_t* __restrict__ counts,
                                   acc_t spatial_scale, int ph_n, int pw_n, int sampling_ratio, bool aligned,
                                   Strides5 sd, scalar_t* __restrict__ grad_in) {
  const int64_t total = s.N * s.C * s.T * s.H * s.W;
  const int64_t n_tb = per_frame ? s.T : 1;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = idx;
    const int64_t x = r % s.W; r /= s.W;
    const int64_t y = r % s.H; r /= s.H;
    const int64_t t = r % s.T; r /= s.T;
    const int64_t c = r % s.C;
    const int64_t n = r / s.C;
    const int64_t bucket = (n * n_tb + (per_frame ? t : 0)) * (tg.ty * tg.tx) + (y / tg.tile) * tg.tx + x / tg.tile;
    const acc_t sum = roi::gather_pixel<acc_t, scalar_t>(rois, n_tb, per_frame, lists + bucket * K, counts[bucket],
                                                         grad, sg.s0, sg.s1, sg.s2, sg.s3, sg.s4, c, t, y, x, s.H,
                                                         s.W, spatial_scale, ph_n, pw_n, sampling_ratio, aligned);
    grad_in[n * sd.s0 + c * sd.s1 + t * sd.s2 + y * sd.s3 + x * sd.s4] = static_cast<scalar_t>(sum);
  }
}

Tensor rois_in_acc_type(const Tensor& rois, ScalarType scalar) {
  const auto want = scalar == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor r = rois.scalar_type() == want ? rois : torch::stable::to(rois, want);
  return torch::stable::contiguous(r);
}

Tensor new_5d(const Tensor& like, std::vector<int64_t> sizes, ScalarType dtype, bool cl) {
  return torch::stable::empty(sizes, dtype, std::nullopt, like.device(), std::nullopt,
                              cl ? torch::headeronly::MemoryFormat::ChannelsLast3d
                                 : torch::headeronly::MemoryFormat::Contiguous);
}

void check_cuda_args(const Tensor& a, const char* an, const Tensor& rois) {
  STD_TORCH_CHECK(a.is_cuda(), "roi_align3d: ", an, " must be a CUDA tensor here");
  STD_TORCH_CHECK(rois.is_cuda() && rois.get_device_index() == a.get_device_index(),
                  "roi_align3d: rois must be on the same CUDA device as ", an);
}

void check_launch() { STSSA_CUDA_CHECK(cudaGetLastError()); }

Tensor roi_align3d_forward_cuda(Tensor input, Tensor rois, double spatial_scale, int64_t pooled_height,
                                int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  check_cuda_args(input, "input", rois);
  STD_TORCH_CHECK(input.dim() == 5, "roi_align3d: input must be [N, C, T, H, W], got ", input.dim(), " dims");
  STD_TORCH_CHECK((rois.dim() == 2 && rois.size(1) == 5) ||
                      (rois.dim() == 3 && rois.size(1) == input.size(2) && rois.size(2) == 5),
                  "roi_align3d: rois must be [K, 5] or [K, T, 5] with T = input.size(2), got ", shape_str(rois));
  check_pooling_args("roi_align3d", pooled_height, pooled_width, sampling_ratio);
  STD_TORCH_CHECK(rois.size(0) == 0 || (input.size(3) > 0 && input.size(4) > 0),
                  "roi_align3d: input height and width must be positive when there are boxes");
  const int32_t dev = input.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  const bool cl = channels_last(input);
  Tensor output = new_5d(input, {rois.size(0), input.size(1), input.size(2), pooled_height, pooled_width},
                         input.scalar_type(), cl);
  if (output.numel() == 0) return output;
  const Tensor r = rois_in_acc_type(rois, input.scalar_type());
  const Shape5 s{input.size(0), input.size(1), input.size(2), input.size(3), input.size(4)};
  const Strides5 si = strides_of(input), so = strides_of(output);
  // channels_last_3d: consecutive threads walk channels (coalesced reads and, the output being
  // channels-last too, coalesced writes). Other views with unit channel stride read coalesced as well.
  const bool channels_fastest = si.s1 == 1 && s.C > 1;
  const cudaStream_t stream = current_stream(dev);
  dispatch_floating(input.scalar_type(), "roi_align3d", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    auto launch = channels_fastest ? roi_align3d_forward_kernel<scalar_t, acc_t, true>
                                   : roi_align3d_forward_kernel<scalar_t, acc_t, false>;
    launch<<<num_blocks(output.numel(), dev), kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), s, si, r.const_data_ptr<acc_t>(), rois.size(0), rois.dim() == 3,
        static_cast<acc_t>(spatial_scale), static_cast<int>(pooled_height), static_cast<int>(pooled_width),
        static_cast<int>(sampling_ratio), aligned, so, output.mutable_data_ptr<scalar_t>());
    check_launch();
  });
  return output;
}

// Smallest power-of-two tile side >= 8 whose bucket lists (buckets x K int32) stay under 64 MiB.
roi::TileGrid choose_tiles(const Shape5& s, int64_t n_tb, int64_t K) {
  int64_t tile = 8;
  const int64_t budget = (int64_t(64) << 20) / 4;
  while (true) {
    const roi::TileGrid tg = roi::tile_grid(s.H, s.W, tile);
    if (s.N * n_tb * tg.ty * tg.tx * std::max<int64_t>(K, 1) <= budget || (tg.ty == 1 && tg.tx == 1)) return tg;
    tile *= 2;
  }
}

Tensor roi_align3d_backward_cuda(Tensor grad, Tensor rois, double spatial_scale, int64_t pooled_height,
                                 int64_t pooled_width, int64_t batch_size, int64_t channels, int64_t time,
                                 int64_t height, int64_t width, int64_t sampling_ratio, bool aligned,
                                 bool deterministic, bool channels_last_out) {
  check_cuda_args(grad, "grad", rois);
  check_pooling_args("_roi_align3d_backward", pooled_height, pooled_width, sampling_ratio);
  STD_TORCH_CHECK((rois.dim() == 2 && rois.size(1) == 5) || (rois.dim() == 3 && rois.size(1) == time &&
                                                             rois.size(2) == 5),
                  "_roi_align3d_backward: rois must be [K, 5] or [K, T, 5], got ", shape_str(rois));
  STD_TORCH_CHECK(grad.dim() == 5 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                      grad.size(2) == time && grad.size(3) == pooled_height && grad.size(4) == pooled_width,
                  "_roi_align3d_backward: grad must be [K, C, T, ph, pw], got ", shape_str(grad));
  const int32_t dev = grad.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  const Shape5 s{batch_size, channels, time, height, width};
  const std::vector<int64_t> sizes{batch_size, channels, time, height, width};
  const auto mf = channels_last_out ? torch::headeronly::MemoryFormat::ChannelsLast3d
                                    : torch::headeronly::MemoryFormat::Contiguous;
  if (batch_size * channels * time * height * width == 0 || grad.numel() == 0) {
    Tensor z = new_5d(grad, sizes, grad.scalar_type(), channels_last_out);
    torch::stable::zero_(z);
    return z;
  }
  const Tensor r = rois_in_acc_type(rois, grad.scalar_type());
  const cudaStream_t stream = current_stream(dev);
  const Strides5 sg = strides_of(grad);
  const int64_t K = rois.size(0);
  const bool per_frame = rois.dim() == 3;
  Tensor result = grad;  // replaced below
  dispatch_floating(grad.scalar_type(), "_roi_align3d_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    if (deterministic) {
      const int64_t n_tb = per_frame ? time : 1;
      const roi::TileGrid tg = choose_tiles(s, n_tb, K);
      const int64_t buckets = batch_size * n_tb * tg.ty * tg.tx;
      Tensor lists = torch::stable::empty({buckets * K}, ScalarType::Int, std::nullopt, grad.device());
      Tensor counts = torch::stable::empty({buckets}, ScalarType::Int, std::nullopt, grad.device());
      roi_align3d_bucket_kernel<acc_t><<<num_blocks(buckets, dev), kThreads, 0, stream>>>(
          r.const_data_ptr<acc_t>(), K, n_tb, tg, s, static_cast<acc_t>(spatial_scale),
          static_cast<int>(pooled_height), static_cast<int>(pooled_width), static_cast<int>(sampling_ratio), aligned,
          lists.mutable_data_ptr<int32_t>(), counts.mutable_data_ptr<int32_t>());
      check_launch();
      result = new_5d(grad, sizes, grad.scalar_type(), channels_last_out);
      roi_align3d_backward_gather_kernel<scalar_t, acc_t><<<num_blocks(result.numel(), dev), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), sg, s, r.const_data_ptr<acc_t>(), K, per_frame, tg,
          lists.const_data_ptr<int32_t>(), counts.const_data_ptr<int32_t>(), static_cast<acc_t>(spatial_scale),
          static_cast<int>(pooled_height), static_cast<int>(pooled_width), static_cast<int>(sampling_ratio), aligned,
          strides_of(result), result.mutable_data_ptr<scalar_t>());
      check_launch();
    } else {
      Tensor acc = new_5d(grad, sizes, r.scalar_type(), false);
      torch::stable::zero_(acc);
      roi_align3d_backward_atomic_kernel<scalar_t, acc_t><<<num_blocks(grad.numel(), dev), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), sg, s, r.const_data_ptr<acc_t>(), K, per_frame,
          static_cast<acc_t>(spatial_scale), static_cast<int>(pooled_height), static_cast<int>(pooled_width),
          static_cast<int>(sampling_ratio), aligned, acc.mutable_data_ptr<acc_t>());
      check_launch();
      result = (acc.scalar_type() == grad.scalar_type() && !channels_last_out)
                   ? acc
                   : torch::stable::to(acc, grad.scalar_type(), std::nullopt, std::nullopt, std::nullopt, false,
                                       false, mf);
    }
  });
  return result;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(stssa, CUDA, m) {
  m.impl("roi_align3d", TORCH_BOX(&roi_align3d_forward_cuda));
  m.impl("_roi_align3d_backward", TORCH_BOX(&roi_align3d_backward_cuda));
}

}  // namespace cuda
}  // namespace stssa
