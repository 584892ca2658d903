// attention3d, CPU "math" path in C++: stssa::_attention3d_cpu (CPU kernel + AutogradCPU kernel).
//
// The same computation as the Python torch_math path of stssa_kernels/ops/attention3d.py (batched GEMMs
// and PyTorch's fused softmax on sequence-layout views, P kept for the backward, gamma and the logit
// scale applied to dq/dk/dv instead of the L x L tensors), op for op and in the same order, so the two
// agree bit for bit (tests/test_attention3d.py checks it). Why C++: on small problems the Python path's
// per-call cost (tens of tensor-method calls, a Python autograd.Function) was as large as the arithmetic
// (measured ~0.2 ms forward, ~0.7 ms forward+backward of pure overhead on this project's CPU); here it is
// a few microseconds per ATen call.
//
// Scope (checked by the Python caller, which takes the other paths otherwise): CPU tensors, one block of
// scores that P fits (sequences * heads * L^2 <= 2^24), non-empty inputs. A double backward is refused
// with a clear error; the registered Python op is the one to trace or compile.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <vector>

namespace stssa {
namespace {

enum Axis { kSpatial = 0, kTemporal = 1, kFull = 2 };

Axis parse_axis(c10::string_view axis) {
  if (axis == "spatial") return kSpatial;
  if (axis == "temporal") return kTemporal;
  TORCH_CHECK(axis == "full", "_attention3d_cpu: axis must be 'spatial', 'temporal' or 'full', got '",
              std::string(axis), "'");
  return kFull;
}

// [B, D, T, H, W] -> [sequences, heads, L, D / heads]: a view where the strides allow, else one copy
// (reference.attention3d.to_seq). A view gets stride 1 on its size-1 dims, as the Python path's stride
// arithmetic (ops/attention3d.py, _seq_geometry) gives q, k, v: GEMM kernels pick their code path from
// the strides, so equal strides keep the two paths' results bit-identical (size-1 head dims included).
at::Tensor to_seq(const at::Tensor& x, Axis axis, int64_t heads, bool unit_size1_strides = true) {
  const int64_t B = x.size(0), D = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4), d = D / heads;
  auto y6 = x.view({B, heads, d, T, H, W});
  at::Tensor y;
  switch (axis) {
    case kSpatial: y = y6.permute({0, 3, 1, 4, 5, 2}).reshape({B * T, heads, H * W, d}); break;
    case kTemporal: y = y6.permute({0, 4, 5, 1, 3, 2}).reshape({B * H * W, heads, T, d}); break;
    default: y = y6.permute({0, 1, 3, 4, 5, 2}).reshape({B, heads, T * H * W, d}); break;
  }
  if (!unit_size1_strides || !y.is_alias_of(x)) return y;  // a copy is contiguous, as in the Python path
  std::array<int64_t, 4> strides{};
  bool changed = false;
  for (int64_t i = 0; i < 4; ++i) {
    strides[i] = y.size(i) == 1 ? 1 : y.stride(i);
    changed |= strides[i] != y.stride(i);
  }
  return changed ? y.as_strided(y.sizes(), strides, y.storage_offset()) : y;
}

// [sequences, heads, L, d] -> [B, heads, d, T, H, W] view (reference.attention3d.seq_as_6d).
at::Tensor seq_as_6d(const at::Tensor& y, Axis axis, at::IntArrayRef shape) {
  const int64_t B = shape[0], T = shape[2], H = shape[3], W = shape[4];
  const int64_t h = y.size(1), d = y.size(3);
  switch (axis) {
    case kSpatial: return y.reshape({B, T, h, H, W, d}).permute({0, 2, 5, 1, 3, 4});
    case kTemporal: return y.reshape({B, H, W, h, T, d}).permute({0, 3, 5, 4, 1, 2});
    default: return y.reshape({B, h, T, H, W, d}).permute({0, 1, 5, 2, 3, 4});
  }
}

at::Tensor heads6(const at::Tensor& x, int64_t heads) {
  return x.view({x.size(0), heads, x.size(1) / heads, x.size(2), x.size(3), x.size(4)});
}

// Tensor::to returns its input when the dtype already matches, which the dispatcher's alias checks
// (opcheck's schema test) reject below autograd; a cast only where one is needed.
at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

at::ScalarType math_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

struct Forward {
  at::Tensor out, qs, ks, vs, p;
};

Forward forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, Axis axis, int64_t heads,
                     double scale, const at::Tensor& residual, const at::Tensor& gamma) {
  Forward f;
  f.qs = to_seq(q, axis, heads);
  f.ks = to_seq(k, axis, heads);
  f.vs = to_seq(v, axis, heads);
  const auto dtype = q.scalar_type(), ct = math_dtype(dtype);
  auto qc = f.qs, kc = f.ks, vc = f.vs;
  if (ct != dtype) qc = qc.to(ct), kc = kc.to(ct), vc = vc.to(ct);
  auto s = at::matmul(qc, kc.transpose(-2, -1));
  if (scale != 1.0) s.mul_(scale);
  f.p = at::softmax(s, -1);
  auto attn = at::matmul(f.p, vc);
  if (ct != dtype) attn = attn.to(dtype);
  // written in v's layout (contiguous or channels_last_3d), the epilogue fused into that one pass
  f.out = at::empty_like(v);
  auto a6 = seq_as_6d(attn, axis, v.sizes());
  auto o6 = heads6(f.out, heads);
  if (!residual.defined() && !gamma.defined()) {
    o6.copy_(a6);
  } else if (!residual.defined()) {
    at::mul_out(o6, a6, cast(gamma, dtype));
  } else if (!gamma.defined()) {
    at::add_out(o6, heads6(residual, heads), a6);
  } else {
    at::addcmul_out(o6, heads6(residual, heads), cast(gamma, dtype), a6);
  }
  return f;
}

at::Tensor write_back(const at::Tensor& like, const at::Tensor& g_seq, Axis axis, int64_t heads) {
  auto dst = at::empty_like(like);
  heads6(dst, heads).copy_(seq_as_6d(g_seq, axis, like.sizes()));
  return dst;
}

class Attention3dCpu : public torch::autograd::Function<Attention3dCpu> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& gamma, int64_t axis, int64_t heads, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto g = gamma.value_or(at::Tensor());
    auto f = forward_impl(q, k, v, static_cast<Axis>(axis), heads, scale, residual.value_or(at::Tensor()), g);
    if (g.defined()) {
      ctx->save_for_backward({q, k, v, f.qs, f.ks, f.vs, f.p, g});
    } else {
      ctx->save_for_backward({q, k, v, f.qs, f.ks, f.vs, f.p});
    }
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    return f.out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "attention3d: a double backward (create_graph=True) is not supported on the eager CPU path; "
                "call torch.ops.stssa.attention3d for a graph whose backward node names the op");
    auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2];
    const at::Tensor gamma = saved.size() > 7 ? saved[7] : at::Tensor();
    const auto axis = static_cast<Axis>(ctx->saved_data["axis"].toInt());
    const int64_t heads = ctx->saved_data["heads"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const auto grad_out = grads[0];
    const auto dtype = q.scalar_type(), ct = math_dtype(dtype);
    auto qs = saved[3], ks = saved[4], vs = saved[5], p = saved[6];
    auto dys = to_seq(grad_out, axis, heads, /*unit_size1_strides=*/false);  // the Python path reshapes dY
    if (ct != dtype) qs = qs.to(ct), ks = ks.to(ct), vs = vs.to(ct), dys = dys.to(ct);
    auto dv = at::matmul(p.transpose(-2, -1), dys);
    auto ds = at::_softmax_backward_data(at::matmul(dys, vs.transpose(-2, -1)), p, -1, p.scalar_type());
    auto dq = at::matmul(ds, ks);
    auto dk = at::matmul(ds.transpose(-2, -1), qs);
    at::Tensor dgamma;
    if (gamma.defined()) {
      auto g = cast(gamma, ct);
      dgamma = (vs * dv).sum(at::kDouble);
      dv.mul_(g);
      auto alpha = g * scale;
      dq.mul_(alpha);
      dk.mul_(alpha);
      dgamma = cast(dgamma.reshape(gamma.sizes()), gamma.scalar_type());
    } else {
      dq.mul_(scale);
      dk.mul_(scale);
    }
    if (ct != dtype) dq = dq.to(dtype), dk = dk.to(dtype), dv = dv.to(dtype);
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    return {write_back(q, dq, axis, heads), write_back(k, dk, axis, heads), write_back(v, dv, axis, heads),
            has_residual ? grad_out : at::Tensor(), dgamma, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 5 && t->device().is_cpu() && t->numel() > 0,
                "_attention3d_cpu: q, k, v must be non-empty 5-D CPU tensors (the Python wrapper checks inputs)");
  }
  TORCH_CHECK(heads >= 1 && q.size(1) % heads == 0 && v.size(1) % heads == 0,
              "_attention3d_cpu: heads must divide Dk and Dv");
}

at::Tensor attention3d_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::string_view axis,
                           int64_t heads, double scale, const std::optional<at::Tensor>& residual,
                           const std::optional<at::Tensor>& gamma) {
  check(q, k, v, heads);
  return forward_impl(q, k, v, parse_axis(axis), heads, scale, residual.value_or(at::Tensor()),
                      gamma.value_or(at::Tensor()))
      .out;
}

at::Tensor attention3d_cpu_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    c10::string_view axis, int64_t heads, double scale,
                                    const std::optional<at::Tensor>& residual,
                                    const std::optional<at::Tensor>& gamma) {
  check(q, k, v, heads);
  return Attention3dCpu::apply(q, k, v, residual, gamma, static_cast<int64_t>(parse_axis(axis)), heads, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(stssa, CPU, m) { m.impl("_attention3d_cpu", &attention3d_cpu); }

TORCH_LIBRARY_IMPL(stssa, AutogradCPU, m) { m.impl("_attention3d_cpu", &attention3d_cpu_autograd); }

}  // namespace stssa
