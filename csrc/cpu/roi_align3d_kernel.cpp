// RoIAlign3D, CPU kernels (STABLE_TORCH_LIBRARY_IMPL(stssa, CPU)), on the LibTorch stable ABI.
//
// The work is done per (box, frame, block of CB channels), vectorised across the channel block:
//  * per (box, frame) the sample positions and bilinear weights are reduced once to two short weight
//    bands per output bin (one along y, one along x; see roi_align3d_cpu_kernels.h) and reused for every
//    channel -- and for every frame when the box is shared;
//  * the feature values of the box's pixels are read as channel vectors: directly when the input is
//    channels-last (channel stride 1); otherwise (contiguous NCTHW, the common case) the rows of a frame's
//    CB planes that the clip's boxes touch are transposed once into a channel-fastest tile [y][x][c]
//    that all boxes of the clip share (8x8 register transposes for fp32; the next frame's rows are
//    prefetched meanwhile), and each box's [frames][bins][c] results are transposed back the same way;
//  * results leave through a per-thread stage: a (box, channel block) output region (contiguous in a
//    contiguous output) and a backward task's grad_input planes are assembled in cache and written as
//    sequential runs, with streaming stores for tensors above kStreamBytes.
// Forward, channels-last input: tasks (box, channel block) ordered by batch index so that boxes of one
// clip reuse its pixels from cache; each task loops over the frames and writes out[k, c0:c0+CB, :, :, :].
// Forward, other layouts: tasks (channel block, clip), channel-block-major so that each thread gets every
// clip; each loops over the frames, then over the clip's boxes.
// Backward (dX = the transpose): tasks (channel block, batch, frame); each owns the grad_input slice
// [n, c0:c0+CB, t, :, :], accumulates all boxes of its batch in roi order into a thread-private plane
// tile (only the rows the boxes touch; the others are zeros) and writes every element of its
// slice exactly once (no zero-fill pass, no atomics, deterministic whatever the thread count; slices of
// different tasks are disjoint whole rows/channel blocks, so there is no false sharing inside a thread
// range).
// Accumulation is in float (double for double inputs); fp16/bf16 are converted once on load and store.
// Input strides are honoured (contiguous, channels_last_3d, slices): no copy of the feature map.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "roi_align3d_common.h"
#include "stable_utils.h"

namespace stssa {
namespace cpu {

// One axis of one box: for output bin p, its samples touch pixels first[p] .. first[p] + count[p] - 1
// with summed weights w[off[p] ..]; lo/span: the union over bins.
template <typename acc_t>
struct BandsView {
  int64_t lo, span;
  const int64_t* first;
  const int32_t* count;
  const int32_t* off;
  const acc_t* w;
};

}  // namespace cpu
}  // namespace stssa

#define STSSA_KERNEL_NS base
#define STSSA_KERNEL_ATTR
#define STSSA_KERNEL_AVX2 0
#include "roi_align3d_cpu_kernels.h"
#undef STSSA_KERNEL_NS
#undef STSSA_KERNEL_ATTR
#undef STSSA_KERNEL_AVX2

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define STSSA_HAVE_AVX2_KERNELS 1
#define STSSA_KERNEL_NS avx2
#define STSSA_KERNEL_ATTR __attribute__((target("avx2,fma")))
#define STSSA_KERNEL_AVX2 1
#include <immintrin.h>
#include "roi_align3d_cpu_kernels.h"
#undef STSSA_KERNEL_NS
#undef STSSA_KERNEL_ATTR
#undef STSSA_KERNEL_AVX2
#endif

namespace stssa {
namespace cpu {
namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

constexpr int CB = 16;  // channels per vector block
// Most buffered forward results per thread (1 MiB of fp32): a few dozen boxes of one clip at T = 8.
constexpr int64_t kObufElems = int64_t(1) << 18;
// Outputs above this size are written with non-temporal (streaming) stores: larger than a typical last-level
// cache, so they would not be read back from cache anyway, and streaming full lines skips the read for
// ownership of every output line.
constexpr int64_t kStreamBytes = int64_t(32) << 20;

bool cpu_has_avx2() {
#ifdef STSSA_HAVE_AVX2_KERNELS
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}



template <typename acc_t>
struct Bands {
  int64_t lo = 0, span = 0;
  std::vector<int64_t> first;
  std::vector<int32_t> count, off;
  std::vector<acc_t> w;
  BandsView<acc_t> view() const { return {lo, span, first.data(), count.data(), off.data(), w.data()}; }
};

template <typename acc_t>
void build_bands(acc_t start, acc_t bin, int grid, int pooled, int64_t size, Bands<acc_t>& b) {
  b.first.assign(pooled, 0);
  b.count.assign(pooled, 0);
  b.off.assign(pooled, 0);
  b.w.clear();
  int64_t lo_all = size, hi_all = -1;
  for (int p = 0; p < pooled; ++p) {
    int64_t lo = size, hi = -1;
    for (int i = 0; i < grid; ++i) {
      const auto a = roi::axis_weights(roi::sample_coord(start, bin, grid, p, i), size);
      if (a.w_lo == acc_t(0) && a.w_hi == acc_t(0)) continue;  // outside the map
      lo = std::min(lo, a.lo);
      hi = std::max(hi, a.hi);
    }
    b.off[p] = static_cast<int32_t>(b.w.size());
    if (hi < lo) continue;
    b.first[p] = lo;
    b.count[p] = static_cast<int32_t>(hi - lo + 1);
    b.w.resize(b.w.size() + (hi - lo + 1), acc_t(0));
    acc_t* w = b.w.data() + b.off[p];
    for (int i = 0; i < grid; ++i) {
      const auto a = roi::axis_weights(roi::sample_coord(start, bin, grid, p, i), size);
      if (a.w_lo == acc_t(0) && a.w_hi == acc_t(0)) continue;
      w[a.lo - lo] += a.w_lo;
      w[a.hi - lo] += a.w_hi;
    }
    lo_all = std::min(lo_all, lo);
    hi_all = std::max(hi_all, hi);
  }
  b.lo = hi_all >= lo_all ? lo_all : 0;
  b.span = hi_all >= lo_all ? hi_all - lo_all + 1 : 0;
}

template <typename acc_t>
struct BoxTables {
  Bands<acc_t> y, x;
  acc_t inv_count = acc_t(1);
  bool empty = true;  // no sample lands on the map: the output is 0
};

template <typename acc_t>
void box_tables(const acc_t* box, acc_t spatial_scale, int ph_n, int pw_n, int sampling_ratio, bool aligned,
                int64_t H, int64_t W, BoxTables<acc_t>& bt) {
  const auto g = roi::roi_geometry(box, spatial_scale, ph_n, pw_n, sampling_ratio, aligned);
  bt.inv_count = acc_t(1) / g.count;
  build_bands(g.start_h, g.bin_h, g.grid_h, ph_n, H, bt.y);
  build_bands(g.start_w, g.bin_w, g.grid_w, pw_n, W, bt.x);
  bt.empty = bt.y.span == 0 || bt.x.span == 0;
}

// Tables of all (box, box frame) pairs, [K * n_boxes], built in parallel.
template <typename acc_t>
std::vector<BoxTables<acc_t>> all_tables(const acc_t* rdata, int64_t K, int64_t n_boxes, double spatial_scale,
                                         int ph_n, int pw_n, int sampling_ratio, bool aligned, int64_t H,
                                         int64_t W) {
  std::vector<BoxTables<acc_t>> tables(static_cast<size_t>(K * n_boxes));
  torch::stable::parallel_for(0, K * n_boxes, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      box_tables<acc_t>(rdata + i * 5 + 1, static_cast<acc_t>(spatial_scale), ph_n, pw_n, sampling_ratio,
                        aligned, H, W, tables[i]);
  });
  return tables;
}

// The tables of box k at frame t (one table per box when the boxes are shared by all frames).
template <typename acc_t>
struct BoxTablesAll {
  std::vector<BoxTables<acc_t>> v;
  bool per_frame;
  int64_t T;
  const BoxTables<acc_t>& at(int64_t k, int64_t t) const { return v[per_frame ? k * T + t : k]; }
};

// The pixel rows [lo, hi) that boxes[0 .. count) read at frame t (lo == hi when none reads any).
template <typename acc_t>
std::pair<int64_t, int64_t> rows_read(const BoxTablesAll<acc_t>& tb, const int64_t* boxes, int64_t count,
                                      int64_t t, int64_t H) {
  int64_t lo = H, hi = 0;
  for (int64_t i = 0; i < count; ++i) {
    const BoxTables<acc_t>& bt = tb.at(boxes[i], t);
    if (bt.empty) continue;
    lo = std::min(lo, bt.y.lo);
    hi = std::max(hi, bt.y.lo + bt.y.span);
  }
  return {lo, std::max(lo, hi)};
}

template <typename acc_t>
bool valid_batch(acc_t b, int64_t N) {
  return b >= acc_t(0) && b < static_cast<acc_t>(N);
}

// Boxes of each batch element, in roi order (rows with an invalid batch index are left out).
template <typename acc_t>
std::vector<std::vector<int64_t>> boxes_by_batch(const acc_t* rdata, int64_t K, int64_t n_boxes, int64_t N) {
  std::vector<std::vector<int64_t>> by_batch(static_cast<size_t>(N));
  for (int64_t k = 0; k < K; ++k) {
    const acc_t b = rdata[k * n_boxes * 5];
    if (valid_batch(b, N)) by_batch[static_cast<int64_t>(b)].push_back(k);
  }
  return by_batch;
}

template <typename acc_t, typename src_t>
void run_forward_box(const src_t* P, int64_t rs, int64_t cs, const BoxTables<acc_t>& bt, int ph_n, int pw_n,
                     acc_t* tmp, acc_t* obuf) {
  const auto by = bt.y.view(), bx = bt.x.view();
#ifdef STSSA_HAVE_AVX2_KERNELS
  if (cpu_has_avx2()) return avx2::forward_box<acc_t, src_t, CB>(P, rs, cs, by, bx, ph_n, pw_n, bt.inv_count, tmp, obuf);
#endif
  base::forward_box<acc_t, src_t, CB>(P, rs, cs, by, bx, ph_n, pw_n, bt.inv_count, tmp, obuf);
}

template <typename acc_t>
void run_backward_box(const acc_t* g, const BoxTables<acc_t>& bt, int ph_n, int pw_n, int64_t W, acc_t* tmp,
                      acc_t* G) {
  const auto by = bt.y.view(), bx = bt.x.view();
#ifdef STSSA_HAVE_AVX2_KERNELS
  if (cpu_has_avx2()) return avx2::backward_box<acc_t, CB>(g, by, bx, ph_n, pw_n, W, tmp, G);
#endif
  base::backward_box<acc_t, CB>(g, by, bx, ph_n, pw_n, W, tmp, G);
}

void transpose_f32(const float* src, int64_t ss, float* dst, int64_t ds, int64_t rows, int64_t cols) {
#ifdef STSSA_HAVE_AVX2_KERNELS
  if (cpu_has_avx2()) return avx2::transpose_f32(src, ss, dst, ds, rows, cols);
#endif
  base::transpose_f32(src, ss, dst, ds, rows, cols);
}

// dst[0 .. n) = src[0 .. n) (fp32, dst fresh output memory). ``stream``: non-temporal stores where dst is
// 16-byte aligned (whole 64-byte lines where it is line-aligned: the forward's regions when C * T is a
// multiple of 16, the backward's planes when H * W is); plain memcpy otherwise or without SSE2.
void copy_out_f32(const float* src, float* dst, int64_t n, bool stream) {
#if defined(__SSE2__)
  if (stream && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
    _mm_sfence();  // the streamed lines are globally visible before the task ends
    return;
  }
#else
  (void)stream;
#endif
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

// Prefetch pixel rows [lo, hi) of cb planes (plane 0 at ``plane``, the others ``cs`` apart; fp32 planes of
// W contiguous pixels): the forward asks for the next frame's rows before it computes the current frame's
// boxes, so that their reads overlap that work.
void prefetch_rows(const float* plane, int64_t cs, int cb, int64_t W, int64_t lo, int64_t hi) {
#if defined(__SSE__)
  const int64_t bytes = (hi - lo) * W * static_cast<int64_t>(sizeof(float));
  for (int c = 0; c < cb; ++c) {
    const char* p = reinterpret_cast<const char*>(plane + c * cs + lo * W);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  }
#else
  (void)plane, (void)cs, (void)cb, (void)W, (void)lo, (void)hi;
#endif
}

// Forward for inputs whose channels are not the fastest index (contiguous NCTHW, the common case).
// Tasks (channel block, clip), channel-block-major so that each thread gets every clip (box sizes differ
// between clips); per frame, the rows of the frame's CB planes that the clip's boxes touch are
// transposed once into a channel-fastest tile [y][x][CB] (8x8 register transposes for fp32 rows), every
// box of the clip is computed from that tile, and each box's results for all frames are transposed into
// the output at the end (boxes in groups that bound the buffer).
// The input is read once, in its own layout; no (box, frame) pair copies pixels of its own.
template <typename scalar_t>
void forward_planar(const Tensor& input, const BoxTablesAll<typename AccType<scalar_t>::type>& tb,
                    const std::vector<std::vector<int64_t>>& by_batch, int ph_n, int pw_n, Tensor& output) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t N = input.size(0), C = input.size(1), T = input.size(2), H = input.size(3), W = input.size(4);
  const Strides5 si = strides_of(input), so = strides_of(output);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  const int64_t bins = static_cast<int64_t>(ph_n) * pw_n;
  const int64_t cblocks = (C + CB - 1) / CB;
  constexpr bool f32 = std::is_same_v<scalar_t, float>;
  const bool rows_dense = f32 && si.s4 == 1 && si.s3 == W;   // a plane's pixels are contiguous
  const bool out_dense = f32 && so.s4 == 1 && so.s3 == pw_n;  // a bin row of one channel is contiguous
  // The output of a (box, channel) pair is T * bins contiguous values (contiguous output): a box's results
  // for all frames are kept in obuf and transposed out once, as CB long sequential runs, rather than one
  // 49-value run per frame and channel (that pattern wrote partial cache lines that later frames complete).
  const bool out_runs = out_dense && so.s2 == bins;
  // ... and with the channels of a box contiguous too (a contiguous output), a (box, channel block) result is
  // one contiguous region of cb * T * bins values: transposed into a thread-local stage (in cache) and then
  // written as one sequential stream (streaming stores for a large output: whole lines, no read of the
  // fresh lines first; the output dominates the forward's memory traffic at AVA sizes).
  const bool out_block = out_runs && so.s1 == T * bins;
  const bool stream = output.numel() * static_cast<int64_t>(sizeof(scalar_t)) > kStreamBytes;
  torch::stable::parallel_for(0, N * cblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(static_cast<size_t>(H * W * CB), acc_t(0)), tmp(static_cast<size_t>(W) * CB), obuf,
        stage(out_block ? static_cast<size_t>(T * bins * CB) : 0);
    std::vector<std::pair<int64_t, int64_t>> rows(static_cast<size_t>(T));  // rows read per frame
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task % N, c0 = (task / N) * CB;
      const int cb = static_cast<int>(std::min<int64_t>(CB, C - c0));
      const auto& boxes = by_batch[n];
      if (boxes.empty()) continue;
      // boxes in groups whose buffered results stay within kObufElems (many boxes or frames per clip: the
      // group's frames are re-tiled per group instead of the buffer growing without bound)
      const int64_t per_box = T * bins * CB;
      const int64_t group = std::max<int64_t>(1, kObufElems / per_box);
      if (cb < CB) std::fill(tile.begin(), tile.end(), acc_t(0));  // lanes >= cb stay finite zeros
      for (int64_t g0 = 0; g0 < static_cast<int64_t>(boxes.size()); g0 += group) {
        const int64_t nb = std::min<int64_t>(group, static_cast<int64_t>(boxes.size()) - g0);
        const int64_t* gboxes = boxes.data() + g0;
        obuf.resize(static_cast<size_t>(nb * per_box));
        for (int64_t t = 0; t < T; ++t) rows[t] = rows_read(tb, gboxes, nb, t, H);
        for (int64_t t = 0; t < T; ++t) {
          const auto [ylo, yhi] = rows[t];
          const scalar_t* plane = in + n * si.s0 + c0 * si.s1 + t * si.s2;
          bool tiled = yhi <= ylo;
          if constexpr (f32) {
            if (!tiled && rows_dense) {
              transpose_f32(plane + ylo * W, si.s1, tile.data() + ylo * W * CB, CB, cb, (yhi - ylo) * W);
              tiled = true;
              if (t + 1 < T) prefetch_rows(plane + si.s2, si.s1, cb, W, rows[t + 1].first, rows[t + 1].second);
            }
          }
          if (!tiled) {
            for (int c = 0; c < cb; ++c)
              for (int64_t y = ylo; y < yhi; ++y) {
                const scalar_t* row = plane + c * si.s1 + y * si.s3;
                acc_t* d = tile.data() + y * W * CB + c;
                for (int64_t x = 0; x < W; ++x) d[x * CB] = static_cast<acc_t>(row[x * si.s4]);
              }
          }
          for (int64_t bi = 0; bi < nb; ++bi) {
            const BoxTables<acc_t>& bt = tb.at(gboxes[bi], t);
            acc_t* ob = obuf.data() + (bi * T + t) * bins * CB;
            if (bt.empty) {
              std::fill(ob, ob + bins * CB, acc_t(0));
            } else {
              run_forward_box<acc_t, acc_t>(tile.data() + (bt.y.lo * W + bt.x.lo) * CB, W * CB, CB, bt, ph_n, pw_n,
                                            tmp.data(), ob);
            }
          }
        }
        for (int64_t bi = 0; bi < nb; ++bi) {
          const acc_t* ob = obuf.data() + bi * per_box;
          scalar_t* o = out + gboxes[bi] * so.s0 + c0 * so.s1;
          if constexpr (f32) {
            if (out_block) {
              transpose_f32(ob, CB, stage.data(), T * bins, T * bins, cb);
              copy_out_f32(stage.data(), o, cb * T * bins, stream);
              continue;
            }
            if (out_runs) {
              transpose_f32(ob, CB, o, so.s1, T * bins, cb);
              continue;
            }
            if (out_dense) {
              for (int64_t t = 0; t < T; ++t) transpose_f32(ob + t * bins * CB, CB, o + t * so.s2, so.s1, bins, cb);
              continue;
            }
          }
          for (int64_t t = 0; t < T; ++t)
            for (int c = 0; c < cb; ++c)
              for (int ph = 0; ph < ph_n; ++ph)
                for (int pw = 0; pw < pw_n; ++pw)
                  o[t * so.s2 + c * so.s1 + ph * so.s3 + pw * so.s4] =
                      static_cast<scalar_t>(ob[(t * bins + ph * pw_n + pw) * CB + c]);
        }
      }
    }
  });
}

template <typename scalar_t>
void forward_impl(const Tensor& input, const Tensor& rois_acc, double spatial_scale, int ph_n, int pw_n,
                  int sampling_ratio, bool aligned, Tensor& output) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t N = input.size(0), C = input.size(1), T = input.size(2), H = input.size(3), W = input.size(4);
  const Strides5 si = strides_of(input), so = strides_of(output);
  const int64_t K = rois_acc.size(0);
  const bool per_frame = rois_acc.dim() == 3;
  const int64_t n_boxes = per_frame ? T : 1;
  const acc_t* rdata = rois_acc.const_data_ptr<acc_t>();
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  const int64_t bins = static_cast<int64_t>(ph_n) * pw_n;
  const int64_t cblocks = (C + CB - 1) / CB;
  const BoxTablesAll<acc_t> tb{
      all_tables<acc_t>(rdata, K, n_boxes, spatial_scale, ph_n, pw_n, sampling_ratio, aligned, H, W), per_frame, T};
  const auto by_batch = boxes_by_batch(rdata, K, n_boxes, N);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  if (!(si.s1 == 1 && C > 1)) {  // channels not the fastest index
    forward_planar<scalar_t>(input, tb, by_batch, ph_n, pw_n, output);
    for (int64_t k = 0; k < K; ++k)  // rows with an invalid batch index (unchecked input): NaN
      if (!valid_batch(rdata[k * n_boxes * 5], N))
        for (int64_t c = 0; c < C; ++c)
          for (int64_t t = 0; t < T; ++t)
            for (int ph = 0; ph < ph_n; ++ph)
              for (int pw = 0; pw < pw_n; ++pw)
                out[k * so.s0 + c * so.s1 + t * so.s2 + ph * so.s3 + pw * so.s4] = static_cast<scalar_t>(nan);
    return;
  }

  // channels-last input: tasks (box, channel block), grouped by batch index then channel block, so consecutive tasks of a
  // thread read the same pixels; rows with an invalid batch index (unchecked input) come last.
  std::vector<int64_t> task_k, task_cb;
  task_k.reserve(K * cblocks);
  task_cb.reserve(K * cblocks);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t cb = 0; cb < cblocks; ++cb)
      for (const int64_t k : by_batch[n]) {
        task_k.push_back(k);
        task_cb.push_back(cb);
      }
  for (int64_t k = 0; k < K; ++k)
    if (!valid_batch(rdata[k * n_boxes * 5], N))
      for (int64_t cb = 0; cb < cblocks; ++cb) {
        task_k.push_back(k);
        task_cb.push_back(cb);
      }

  // direct channel-vector reads need unit channel stride, a full block and no dtype conversion
  const bool direct_ok = std::is_same_v<scalar_t, acc_t>;
  torch::stable::parallel_for(0, static_cast<int64_t>(task_k.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile, tmp(static_cast<size_t>(W) * CB), obuf(static_cast<size_t>(bins) * CB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task_k[task];
      const int64_t c0 = task_cb[task] * CB;
      const int cb = static_cast<int>(std::min<int64_t>(CB, C - c0));
      const acc_t bval = rdata[k * n_boxes * 5];
      const bool valid = valid_batch(bval, N);
      const int64_t n = valid ? static_cast<int64_t>(bval) : 0;
      for (int64_t t = 0; t < T; ++t) {
        const BoxTables<acc_t>& bt = tb.at(k, t);
        if (!valid || bt.empty) {
          std::fill(obuf.begin(), obuf.end(), valid ? acc_t(0) : nan);
        } else {
          const int64_t ys = bt.y.span, xs = bt.x.span;
          const scalar_t* base = in + n * si.s0 + c0 * si.s1 + t * si.s2 + bt.y.lo * si.s3 + bt.x.lo * si.s4;
          if (direct_ok && cb == CB) {
            run_forward_box<acc_t, scalar_t>(base, si.s3, si.s4, bt, ph_n, pw_n, tmp.data(), obuf.data());
          } else {
            tile.resize(static_cast<size_t>(ys * xs * CB));
            if (cb < CB) std::fill(tile.begin(), tile.end(), acc_t(0));
            for (int c = 0; c < cb; ++c) {
              const scalar_t* plane = base + c * si.s1;
              acc_t* dst = tile.data() + c;
              for (int64_t y = 0; y < ys; ++y) {
                const scalar_t* row = plane + y * si.s3;
                acc_t* d = dst + y * xs * CB;
                if (si.s4 == 1) {
                  for (int64_t x = 0; x < xs; ++x) d[x * CB] = static_cast<acc_t>(row[x]);
                } else {
                  for (int64_t x = 0; x < xs; ++x) d[x * CB] = static_cast<acc_t>(row[x * si.s4]);
                }
              }
            }
            run_forward_box<acc_t, acc_t>(tile.data(), xs * CB, CB, bt, ph_n, pw_n, tmp.data(), obuf.data());
          }
        }
        scalar_t* o = out + k * so.s0 + c0 * so.s1 + t * so.s2;
        if (so.s1 == 1) {  // channels-last output: CB contiguous values per bin
          for (int ph = 0; ph < ph_n; ++ph)
            for (int pw = 0; pw < pw_n; ++pw) {
              const acc_t* src = obuf.data() + (ph * pw_n + pw) * CB;
              scalar_t* d = o + ph * so.s3 + pw * so.s4;
              for (int c = 0; c < cb; ++c) d[c] = static_cast<scalar_t>(src[c]);
            }
        } else {
          for (int c = 0; c < cb; ++c) {
            scalar_t* d = o + c * so.s1;
            for (int ph = 0; ph < ph_n; ++ph)
              for (int pw = 0; pw < pw_n; ++pw)
                d[ph * so.s3 + pw * so.s4] = static_cast<scalar_t>(obuf[(ph * pw_n + pw) * CB + c]);
          }
        }
      }
    }
  });
}

Tensor rois_in_acc_type(const Tensor& rois, ScalarType scalar) {
  const auto want = scalar == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor r = rois.scalar_type() == want ? rois : torch::stable::to(rois, want);
  return torch::stable::contiguous(r);
}

// A freshly allocated large output is first touched by the kernel: ask Linux for transparent huge pages
// (THP "madvise" mode, the common default) so that first touch costs one fault per 2 MiB instead of one
// per 4 KiB -- at AVA sizes the 4 KiB faults cost more than the kernel itself. What torch's own
// THP_MEM_ALLOC_ENABLE=1 does for every allocation, here only for this op's outputs; a no-op elsewhere.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (bytes < 2 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only: errors ignored
#else
  (void)t;
#endif
}

Tensor new_5d(const Tensor& like, std::vector<int64_t> sizes, ScalarType dtype, bool channels_last) {
  Tensor t = torch::stable::empty(sizes, dtype, std::nullopt, like.device(), std::nullopt,
                                  channels_last ? torch::headeronly::MemoryFormat::ChannelsLast3d
                                                : torch::headeronly::MemoryFormat::Contiguous);
  advise_huge_pages(t);
  return t;
}

Tensor roi_align3d_forward_cpu(Tensor input, Tensor rois, double spatial_scale, int64_t pooled_height,
                               int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  STD_TORCH_CHECK(input.is_cpu(), "roi_align3d: input must be a CPU tensor here");
  STD_TORCH_CHECK(rois.is_cpu(), "roi_align3d: rois must be on the same device as input (CPU)");
  STD_TORCH_CHECK(input.dim() == 5, "roi_align3d: input must be [N, C, T, H, W], got ", input.dim(), " dims");
  STD_TORCH_CHECK((rois.dim() == 2 && rois.size(1) == 5) ||
                      (rois.dim() == 3 && rois.size(1) == input.size(2) && rois.size(2) == 5),
                  "roi_align3d: rois must be [K, 5] or [K, T, 5] with T = input.size(2) = ", input.size(2),
                  ", got ", shape_str(rois));
  check_pooling_args("roi_align3d", pooled_height, pooled_width, sampling_ratio);
  STD_TORCH_CHECK(rois.size(0) == 0 || (input.size(3) > 0 && input.size(4) > 0),
                  "roi_align3d: input height and width must be positive when there are boxes");
  Tensor output = new_5d(input, {rois.size(0), input.size(1), input.size(2), pooled_height, pooled_width},
                         input.scalar_type(), channels_last(input));
  if (output.numel() == 0) return output;
  const Tensor r = rois_in_acc_type(rois, input.scalar_type());
  dispatch_floating(input.scalar_type(), "roi_align3d", [&](auto tag) {
    using scalar_t = decltype(tag);
    forward_impl<scalar_t>(input, r, spatial_scale, static_cast<int>(pooled_height), static_cast<int>(pooled_width),
                           static_cast<int>(sampling_ratio), aligned, output);
  });
  return output;
}

template <typename scalar_t>
void backward_impl(const Tensor& grad, const Tensor& rois_acc, double spatial_scale, int ph_n, int pw_n,
                   int sampling_ratio, bool aligned, Tensor& grad_in) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t N = grad_in.size(0), C = grad_in.size(1), T = grad_in.size(2), H = grad_in.size(3),
                W = grad_in.size(4);
  const Strides5 sg = strides_of(grad), sd = strides_of(grad_in);
  const int64_t K = rois_acc.size(0);
  const bool per_frame = rois_acc.dim() == 3;
  const int64_t n_boxes = per_frame ? T : 1;
  const acc_t* rdata = rois_acc.const_data_ptr<acc_t>();
  const scalar_t* gd = grad.const_data_ptr<scalar_t>();
  scalar_t* gi = grad_in.mutable_data_ptr<scalar_t>();
  const auto by_batch = boxes_by_batch(rdata, K, n_boxes, N);
  const BoxTablesAll<acc_t> tb{
      all_tables<acc_t>(rdata, K, n_boxes, spatial_scale, ph_n, pw_n, sampling_ratio, aligned, H, W), per_frame, T};
  const int64_t cblocks = (C + CB - 1) / CB;
  const int64_t bins = static_cast<int64_t>(ph_n) * pw_n;

  constexpr bool f32 = std::is_same_v<scalar_t, float>;
  const bool g_dense = f32 && sg.s4 == 1 && sg.s3 == pw_n;                    // a channel's bins contiguous
  const bool gi_dense = f32 && sd.s4 == 1 && sd.s3 == W && !(sd.s1 == 1 && C > 1);  // planes contiguous
  // A task's slice of grad_input is cb planes of H * W contiguous values: assembled (zeros and transposed
  // rows) in a thread-local stage and written one plane at a time as a sequential stream, with streaming
  // stores for a large grad_input (as the forward's output).
  const bool stream = grad_in.numel() * static_cast<int64_t>(sizeof(scalar_t)) > kStreamBytes;
  torch::stable::parallel_for(0, N * cblocks * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> G(static_cast<size_t>(H * W * CB)), tmp(static_cast<size_t>(W) * CB),
        gbuf(static_cast<size_t>(bins) * CB, acc_t(0)), stage(gi_dense ? static_cast<size_t>(H * W * CB) : 0);
    for (int64_t task = begin; task < end; ++task) {
      // channel-block-major, so that each thread gets every clip (box sizes differ between clips)
      const int64_t t = task % T;
      const int64_t n = (task / T) % N;
      const int64_t c0 = (task / (T * N)) * CB;
      const int cb = static_cast<int>(std::min<int64_t>(CB, C - c0));
      // The rows of the plane this frame's boxes touch: only these are accumulated and transposed; on the
      // dense fp32 path the others are written as zeros directly (small and far-away boxes leave most rows
      // untouched).
      const auto& boxes = by_batch[n];
      const auto [ylo, yhi] = gi_dense ? rows_read(tb, boxes.data(), static_cast<int64_t>(boxes.size()), t, H)
                                       : std::pair<int64_t, int64_t>(0, H);
      std::fill(G.begin() + ylo * W * CB, G.begin() + yhi * W * CB, acc_t(0));
      for (const int64_t k : boxes) {
        const BoxTables<acc_t>& bt = tb.at(k, t);
        if (bt.empty) continue;
        const scalar_t* go = gd + k * sg.s0 + c0 * sg.s1 + t * sg.s2;
        if constexpr (f32) {
          if (g_dense) {  // lanes >= cb of gbuf are never written: they stay 0
            transpose_f32(go, sg.s1, gbuf.data(), CB, cb, bins);
            for (int64_t i = 0; i < bins * CB; ++i) gbuf[i] *= bt.inv_count;
            run_backward_box<acc_t>(gbuf.data(), bt, ph_n, pw_n, W, tmp.data(), G.data());
            continue;
          }
        }
        for (int c = 0; c < cb; ++c)
          for (int ph = 0; ph < ph_n; ++ph)
            for (int pw = 0; pw < pw_n; ++pw)
              gbuf[(ph * pw_n + pw) * CB + c] =
                  static_cast<acc_t>(go[c * sg.s1 + ph * sg.s3 + pw * sg.s4]) * bt.inv_count;
        run_backward_box<acc_t>(gbuf.data(), bt, ph_n, pw_n, W, tmp.data(), G.data());
      }
      scalar_t* d = gi + n * sd.s0 + c0 * sd.s1 + t * sd.s2;
      if constexpr (f32) {
        if (gi_dense) {
          const int64_t HW = H * W;
          for (int c = 0; c < cb; ++c) {
            std::fill(stage.data() + c * HW, stage.data() + c * HW + ylo * W, acc_t(0));
            std::fill(stage.data() + c * HW + yhi * W, stage.data() + (c + 1) * HW, acc_t(0));
          }
          if (yhi > ylo) transpose_f32(G.data() + ylo * W * CB, CB, stage.data() + ylo * W, HW, (yhi - ylo) * W, cb);
          for (int c = 0; c < cb; ++c) copy_out_f32(stage.data() + c * HW, d + c * sd.s1, HW, stream);
          continue;
        }
      }
      if (sd.s1 == 1) {
        for (int64_t y = 0; y < H; ++y)
          for (int64_t x = 0; x < W; ++x) {
            const acc_t* src = G.data() + (y * W + x) * CB;
            scalar_t* dst = d + y * sd.s3 + x * sd.s4;
            for (int c = 0; c < cb; ++c) dst[c] = static_cast<scalar_t>(src[c]);
          }
      } else {
        for (int c = 0; c < cb; ++c) {
          scalar_t* plane = d + c * sd.s1;
          for (int64_t y = 0; y < H; ++y) {
            scalar_t* row = plane + y * sd.s3;
            const acc_t* src = G.data() + y * W * CB + c;
            for (int64_t x = 0; x < W; ++x) row[x * sd.s4] = static_cast<scalar_t>(src[x * CB]);
          }
        }
      }
    }
  });
}

Tensor roi_align3d_backward_cpu(Tensor grad, Tensor rois, double spatial_scale, int64_t pooled_height,
                                int64_t pooled_width, int64_t batch_size, int64_t channels, int64_t time,
                                int64_t height, int64_t width, int64_t sampling_ratio, bool aligned,
                                bool /*deterministic: always*/, bool channels_last_out) {
  STD_TORCH_CHECK(grad.is_cpu() && rois.is_cpu(), "_roi_align3d_backward: expected CPU tensors");
  check_pooling_args("_roi_align3d_backward", pooled_height, pooled_width, sampling_ratio);
  STD_TORCH_CHECK((rois.dim() == 2 && rois.size(1) == 5) || (rois.dim() == 3 && rois.size(1) == time &&
                                                             rois.size(2) == 5),
                  "_roi_align3d_backward: rois must be [K, 5] or [K, T, 5], got ", shape_str(rois));
  STD_TORCH_CHECK(grad.dim() == 5 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                      grad.size(2) == time && grad.size(3) == pooled_height && grad.size(4) == pooled_width,
                  "_roi_align3d_backward: grad must be [K, C, T, ph, pw] = [", rois.size(0), ", ", channels, ", ",
                  time, ", ", pooled_height, ", ", pooled_width, "], got ", shape_str(grad));
  STD_TORCH_CHECK(batch_size >= 0 && channels >= 0 && time >= 0 && height >= 0 && width >= 0,
                  "_roi_align3d_backward: sizes must be non-negative");
  Tensor grad_in = new_5d(grad, {batch_size, channels, time, height, width}, grad.scalar_type(), channels_last_out);
  if (grad_in.numel() == 0) return grad_in;
  const Tensor r = rois_in_acc_type(rois, grad.scalar_type());
  dispatch_floating(grad.scalar_type(), "_roi_align3d_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    backward_impl<scalar_t>(grad, r, spatial_scale, static_cast<int>(pooled_height),
                            static_cast<int>(pooled_width), static_cast<int>(sampling_ratio), aligned, grad_in);
  });
  return grad_in;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(stssa, CPU, m) {
  m.impl("roi_align3d", TORCH_BOX(&roi_align3d_forward_cpu));
  m.impl("_roi_align3d_backward", TORCH_BOX(&roi_align3d_backward_cpu));
}

}  // namespace cpu
}  // namespace stssa
