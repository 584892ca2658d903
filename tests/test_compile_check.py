"""compile_check builds what the JIT builds: specs from recorded launches carry the JIT's
specialisations for the layouts the ops see, size arguments marked ``do_not_specialize`` do not multiply
the variants, every ``tl.dot`` is reported as lowered, and recorded launcher calls replay for any arch."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from stssa_kernels import compile_check as CC  # noqa: E402
from stssa_kernels.ops import attention3d as A  # noqa: E402
from stssa_kernels.triton import _launch  # noqa: E402
from stssa_kernels.triton import attention3d as TK  # noqa: E402
from stssa_kernels.triton import temporal_proj as TP  # noqa: E402


def _spec(cc, layout, dtype, shape, dv, axis, kernel):
    specs = CC.specs_from_launches([(ln, lab, layout) for ln, lab in TK.record_call(cc, layout, dtype, shape, dv, axis)], cc)
    return next(s for s in specs if s.name == kernel)


def test_default_archs_include_sm86():
    assert CC.DEFAULT_ARCHS == ["sm_75", "sm_80", "sm_86", "sm_90"]
    assert [TK.arch_family(cc) for cc in (75, 80, 86, 87, 89, 90, 100, 120, 121)] == [75, 80, 86, 80, 86, 90, 90, 86, 86]
    # sm_120/121 (RTX 50xx class, ~100 KB of shared memory per block) take the sm_80-family tiles: the
    # sm90 temporal_proj tiles need 128-147 KB
    from stssa_kernels.ops import _arch
    from stssa_kernels.triton import temporal_proj as TP
    assert [_arch.family(cc) for cc in (75, 80, 89, 90, 100, 120)] == [75, 80, 80, 90, 90, 80]
    assert TP.pick_config(120, 256, [256]) is TP.CONFIGS["sm80"] and TP.pick_config(90, 256, [256]) is TP.CONFIGS["sm90"]


def test_specs_carry_the_layouts_unit_strides():
    # temporal_proj's channel slices: channel stride 1 (the vectorised direction), specialised as constexpr
    s = _spec(90, "temporal_proj", torch.bfloat16, (2, 64, 4, 7, 7), 256, "spatial", "attn3d_fwd_packed")
    assert s.signature["q_st"][0] == "constexpr"
    assert s.constexprs[(list(s.signature).index("q_st"), 0)] == 1
    # contiguous NCTHW, spatial axis: (h, w) merge into one token dim of stride 1
    s = _spec(90, "contiguous", torch.bfloat16, (2, 64, 4, 7, 7), 256, "spatial", "attn3d_fwd_packed")
    assert s.constexprs[(list(s.signature).index("TOK_DIMS"),)] == 1
    assert s.signature["q_st"][5] == "constexpr"
    # the odd-strided worst case: no stride is specialised and no dims merge
    s = _spec(90, "strided", torch.bfloat16, (2, 16, 3, 7, 7), 24, "spatial", "attn3d_fwd_packed")
    assert all(t == "i32" for t in s.signature["q_st"][:2] + s.signature["q_st"][2:4] + s.signature["q_st"][5:7])
    assert s.constexprs[(list(s.signature).index("TOK_DIMS"),)] == 2
    # 16-byte aligned data pointers are marked divisible, as the JIT marks them
    assert [["tt.divisibility", 16]] in [s.attrs.get((list(s.signature).index("Q"),))]


def test_size_arguments_do_not_multiply_variants():
    # the number of RoIs (sequences) varies per training step: 3 and 16 RoIs compile the same kernels
    def keys(B, T=8):
        recorded = TK.record_call(90, "temporal_proj", torch.bfloat16, (B, 64, T, 7, 7), 256, "temporal")
        return {_launch.jit_compile_args(ln.kernel, ln.args, ln.kwargs, 90)[-1] for ln, _ in recorded}
    assert keys(3) == keys(16)
    # the sequence length stays specialised (its divisibility shapes the token masks)
    assert keys(3, T=16) != keys(3, T=15)
    tp = [_launch.jit_compile_args(ln.kernel, ln.args, ln.kwargs, 90)[-1]
          for ln, _ in TP.record_call(90, torch.bfloat16, 256, [256, 256, 128], [7, 7, 1])]
    assert len(set(tp)) == 3


def test_every_launch_pins_the_compile_options():
    # FP fusion pinned on in every launch (triton 3.10 changes its default), and compile_check builds with it
    launches = [ln for shape, axis in (((2, 16, 3, 7, 7), "spatial"), ((1, 64, 2, 9, 9), "full"))
                for ln, _ in TK.record_call(90, "contiguous", torch.float16, shape, 24, axis)]
    launches += [ln for ln, _ in TP.record_call(90, torch.bfloat16, 256, [256, 256, 128], [7, 7, 1])]
    names = {ln.kernel.fn.__name__ for ln in launches}
    assert {"_attn3d_fwd_packed", "_attn3d_bwd_packed", "_attn3d_fwd_flash", "_attn3d_bwd_delta", "_attn3d_bwd_dq",
            "_attn3d_bwd_dkdv", "_temporal_proj_fwd_kernel", "_temporal_proj_bwd_dx_kernel",
            "_temporal_proj_bwd_dw_kernel"} <= names
    for ln in launches:
        assert _launch.LAUNCH_OPTIONS.items() <= ln.kwargs.items(), ln.kernel.fn.__name__
        options = CC.spec_from_launch(ln, 90, "").options
        assert all(options[k] == v for k, v in _launch.LAUNCH_OPTIONS.items()), ln.kernel.fn.__name__


def test_every_plan_tile_has_a_spec_per_dtype():
    for cc in (75, 80, 86, 90):
        specs = {(s.name, s.config) for s in TK.compile_specs(cc)}
        for dt, tag in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            if cc == 75 and dt == torch.bfloat16:  # runs PyTorch math there: no Triton build to check
                assert not any(c.startswith("bf16") for _, c in specs)
                for axis, L in (("spatial", 49), ("temporal", 8), ("full", 784)):  # the dispatcher agrees
                    prob = A.Attention3dProblem("cuda", 75, dt, False, axis, L, 64, 512, L * L)
                    assert A.DISPATCH.select(prob).backend != "triton", (axis, L)
                continue
            for L, dk in ((49, 512), (8, 64), (784, 64), (784, 128), (784, 256)):
                p = TK.plan(cc, L, dk, 512, dt)
                f, b = p.fwd, p.bwd
                if p.kind == "packed":
                    want = [("attn3d_fwd_packed", f"{tag} BM={f.block_m} BDK={p.block_dk} BDV={f.block_dv} w{f.num_warps}")]
                else:
                    bc = f"{tag} BM={b.block_m} BN={b.block_n} BDK={p.block_dk} BDV={b.block_dv} w{b.num_warps}"
                    want = [("attn3d_fwd_flash", f"{tag} BM={f.block_m} BN={f.block_n} BDK={p.block_dk} "
                             f"BDV={f.block_dv} w{f.num_warps}"), ("attn3d_bwd_dq", bc),
                            ("attn3d_bwd_dkdv", bc + " Dv<=BDV"), ("attn3d_bwd_dkdv", bc + " wide-Dv")]
                for w in want:
                    assert w in specs, (cc, L, dk, w)
        keys = [s.key for s in TK.compile_specs(cc)]
        assert len(keys) == len(set(keys))


TTGIR = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 4]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0}>
module {
  %a = ttng.warp_group_dot %x, %y, %z {isAsync = true} : !ttg.memdesc<64x64xbf16> * !ttg.memdesc<64x32xbf16> -> tensor<64x32xf32, #mma> loc(#loc12)
  %b:3 = ttng.warp_group_dot_wait %a, %x, %y {pendings = 0 : i32} : tensor<64x32xf32, #mma> loc(#loc12)
  %c = tt.dot %p, %q, %r, inputPrecision = tf32 : tensor<16x64xbf16> * tensor<64x32xbf16> -> tensor<16x32xf32, #mma1> loc(#loc13)
  %d = tt.dot %p, %q, %r, inputPrecision = ieee : tensor<16x64xf32> * tensor<64x32xf32> -> tensor<16x32xf32, #blocked> loc(#loc14)
}
#loc = loc("/x/attention3d.py":10:1)
#loc5 = loc("/x/attention3d.py":140:20)
#loc6 = loc("/x/attention3d.py":300:9)
#loc12 = loc("s"(#loc5))
#loc13 = loc(callsite(#loc5 at #loc6))
#loc14 = loc("/x/attention3d.py":305:11)
"""


def test_dot_lowering_reads_each_dot():
    dots = CC.dot_lowering(TTGIR)
    assert dots == [("140", "wgmma"), ("140", "mma.sync"), ("305", "fma")]
    assert CC._mma_summary(dots) == "wgmma 1/3 mma.sync 1/3 fma 1/3"


@pytest.mark.parametrize("cc,kind", [(90, "wgmma"), (80, "mma.sync"), (75, "fma")])
def test_compiled_dots_per_arch(cc, kind):
    # a real build for each arch without a GPU: the packed forward's dots on the matrix units of that arch
    s = _spec(cc, "contiguous", torch.float16, (2, 64, 4, 7, 7), 64, "spatial", "attn3d_fwd_packed")
    row = CC._compile_one(s, cc, CC._cuobjdump())
    assert row.status == "ok", row
    assert row.dots and all(d.endswith(":" + kind) for d in row.dots.split()), row.dots
    assert row.regs is None or row.regs > 0


def test_recorded_calls_replay_for_another_arch():
    # record launcher calls (as under the interpreter), encode to JSON and replay for sm_90:
    # the same launches as calling the launchers for sm_90 directly
    q, k, v, r = TK.layout_tensors("channels_last", (2, 32, 4, 7, 7), 64, torch.float16)
    g = torch.zeros(())
    p80 = TK.plan(80, 49, 32, 64, torch.float16)
    with _launch.record_launcher_calls() as calls, _launch.capture_launches():
        out, lse, attn = TK.forward(q, k, v, "spatial", 1, 0.2, r, g, p80)
        TK.backward(out, q, k, v, out, lse, "spatial", 1, 0.2, g, p80)
    enc = json.loads(json.dumps(CC.encode_calls(calls)))
    replayed = CC.count_variants(CC.replay_calls(enc, 90, torch.bfloat16), 90)
    direct = TK.record_call(90, "channels_last", torch.bfloat16, (2, 32, 4, 7, 7), 64, "spatial")
    assert replayed["launches"] == len(direct) == 2
    assert replayed["variants"] == CC.count_variants([ln for ln, _ in direct], 90)["variants"] == 2
