// Inner kernels of the CPU RoIAlign3D, vectorised across a block of CB channels (the channel index is
// the fastest one in every buffer here). Included twice by roi_align3d_kernel.cpp: once for the baseline
// x86-64 ISA and once with AVX2+FMA, picked at run time, so one binary is fast on current CPUs and still
// runs on old ones. Expects STSSA_KERNEL_NS (namespace) and STSSA_KERNEL_ATTR (function attribute).
//
// The bilinear weight of a sample factorises into a y part and an x part (a sample outside the map has a
// zero y or x part), so a bin's average is separable:
//   out[ph, pw, c] = inv_count * sum_x Ax[pw, x] * (sum_y Ay[ph, y] * X[y, x, c]),
// with Ay[ph, .] the summed y weights of bin row ph's samples: a short band of consecutive pixel rows
// (Bands below; the same for x). The bands are computed once per (box, frame) and reused for every channel.

namespace stssa {
namespace cpu {
namespace STSSA_KERNEL_NS {

// out (pooled_h x pooled_w x CB) for one (box, frame, channel block). Pixel (y, x) of the box's span,
// channel c, is read at P[(y - by.lo) * rs + (x - bx.lo) * cs + c]. tmp: bx.span * CB accumulators.
template <typename acc_t, typename src_t, int CB>
STSSA_KERNEL_ATTR void forward_box(const src_t* __restrict P, int64_t rs, int64_t cs, const BandsView<acc_t>& by,
                                   const BandsView<acc_t>& bx, int ph_n, int pw_n, acc_t inv_count,
                                   acc_t* __restrict tmp, acc_t* __restrict out) {
  for (int ph = 0; ph < ph_n; ++ph) {
    acc_t* o = out + static_cast<int64_t>(ph) * pw_n * CB;
    const int ny = by.count[ph];
    if (ny == 0) {
      for (int i = 0; i < pw_n * CB; ++i) o[i] = acc_t(0);
      continue;
    }
    const int64_t y0 = by.first[ph] - by.lo;
    const acc_t* wy = by.w + by.off[ph];
    for (int64_t xi = 0; xi < bx.span; ++xi) {
      acc_t acc[CB];
      for (int c = 0; c < CB; ++c) acc[c] = acc_t(0);
      for (int j = 0; j < ny; ++j) {
        const acc_t a = wy[j];
        const src_t* p = P + (y0 + j) * rs + xi * cs;
        for (int c = 0; c < CB; ++c) acc[c] += a * static_cast<acc_t>(p[c]);
      }
      for (int c = 0; c < CB; ++c) tmp[xi * CB + c] = acc[c];
    }
    for (int pw = 0; pw < pw_n; ++pw) {
      acc_t acc[CB];
      for (int c = 0; c < CB; ++c) acc[c] = acc_t(0);
      const int nx = bx.count[pw];
      const acc_t* t = tmp + (bx.first[pw] - bx.lo) * CB;
      const acc_t* wx = bx.w + bx.off[pw];
      for (int i = 0; i < nx; ++i) {
        const acc_t a = wx[i];
        for (int c = 0; c < CB; ++c) acc[c] += a * t[i * CB + c];
      }
      for (int c = 0; c < CB; ++c) o[pw * CB + c] = acc[c] * inv_count;
    }
  }
}

// The transpose: G[(y * gw + x) * CB + c] += sum_ph Ay[ph, y] sum_pw Ax[pw, x] g[(ph * pw_n + pw) * CB + c]
// for one (box, frame, channel block); G spans the whole plane (gw = W), g is pre-scaled by inv_count.
template <typename acc_t, int CB>
STSSA_KERNEL_ATTR void backward_box(const acc_t* __restrict g, const BandsView<acc_t>& by,
                                    const BandsView<acc_t>& bx, int ph_n, int pw_n, int64_t gw,
                                    acc_t* __restrict tmp, acc_t* __restrict G) {
  for (int ph = 0; ph < ph_n; ++ph) {
    const int ny = by.count[ph];
    if (ny == 0) continue;
    for (int64_t i = 0; i < bx.span * CB; ++i) tmp[i] = acc_t(0);
    for (int pw = 0; pw < pw_n; ++pw) {
      const acc_t* gv = g + (static_cast<int64_t>(ph) * pw_n + pw) * CB;
      acc_t* t = tmp + (bx.first[pw] - bx.lo) * CB;
      const acc_t* wx = bx.w + bx.off[pw];
      const int nx = bx.count[pw];
      for (int i = 0; i < nx; ++i) {
        const acc_t a = wx[i];
        for (int c = 0; c < CB; ++c) t[i * CB + c] += a * gv[c];
      }
    }
    const acc_t* wy = by.w + by.off[ph];
    for (int j = 0; j < ny; ++j) {
      const acc_t a = wy[j];
      acc_t* row = G + ((by.first[ph] + j) * gw + bx.lo) * CB;
      for (int64_t i = 0; i < bx.span * CB; ++i) row[i] += a * tmp[i];
    }
  }
}

}  // namespace STSSA_KERNEL_NS
}  // namespace cpu
}  // namespace stssa
