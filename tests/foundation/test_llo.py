"""autotune/llo.py: parsing libtpu's final bundle dump (a synthetic dump in its format) and, in the
aot tier, reading a real one from a compile."""

from __future__ import annotations

import pytest

from autotune import llo
from autotune.cost_model import Traffic, predict

# The format of libtpu's *-final_bundles.txt: address, control marker, one ">" per enclosing loop.
DUMP = """\
= control target key start
LB: loop body
= control target key end

     0   :  { %s1 = inlined_call_operand.vmem [shape: s32[8]] } /* entry bundle: %toy.1 = custom-call(%a) */
   0x1   :  { %s2 = smov.u32 0 }
   0x2 LB: > { %s3 = sadd.s32 1, %s2  ;;  %9 = dma.hbm_to_vmem [thread:$0] %s1, 64 }
   0x3   : > { %p4 = scmp.ge.s32.totalorder %s3, 5 /* loop exit test */ }
   0x4   :  {}
   0x5   :  { %s5 = smov.u32 0 }
   0x6 LB: > { %s6 = sadd.s32 1, %s5 }
   0x7 LB: >> { %v1 = vld [vmem:[%s1] sm:$0xff]  ;;  %10 = vmatpush3.bf16.msra.mxu0 %v1 }
   0x8   :  {}
   0x9   : >> { %11 = vmatmul.mubr.bf16.vlgmr.msra.gmra.mxu0 %v1  ;;  %p7 = scmp.ge.s32.totalorder %s6, 3 /* loop exit test */ }
   0xa   : > { %p8 = scmp.lt.s32.totalorder %s6, %s9 /* loop exit test */ }
   0xb   :  { %s10 = smov.u32 0 }
"""


def test_parse_bundles_finds_loops_nesting_and_static_trips():
    kb = llo.parse_bundles(DUMP, "toy")
    assert kb.total == 12  # the empty bundle counts: it is a cycle
    dma, outer, inner = kb.loops
    assert (dma.depth, dma.bundles, dma.own_bundles, dma.dmas, dma.trips, dma.parent) == (1, 3, 3, 1, 5, None)
    assert (outer.depth, outer.bundles, outer.own_bundles, outer.trips, outer.parent) == (1, 5, 2, None, None)
    assert (inner.depth, inner.bundles, inner.mxu_ops, inner.trips, inner.parent) == (2, 3, 2, 3, 1)
    assert kb.compute_loop() == 2 and kb.bundles_per_dma() == 3.0
    assert kb.ancestors(2) == [1]
    # one entry: 4 straight-line + 3 x 5 (static) + 2 x 1 (run-time trips: once) + 3 x 3
    assert kb.static_bundles() == (4 + 15 + 2 + 9, False)
    # the caller knows the run-time loop runs 10 times in all and the compute loop 30
    assert kb.issued_bundles(1, {1: 10, 2: 30}) == 4 + 15 + 20 + 90


# A software-pipelined grid loop (Pallas' BlockSpec pipeline) of 4 steps runs 6 iterations; its
# compute stage (here with an inner MXU loop of 2 trips) is branched around unless 1 <= i < 5.
PIPELINED = """\
     0   :  { %s1 = inlined_call_operand.vmem [shape: s32[8]] } /* entry bundle: %mm.1 = custom-call(%a) */
   0x1 LB: > { %s9 = sadd.s32 4294967295, %s20 /* iteration index, stage = 1 */  ;;  %s20 = sphi %s2, %s21 }
   0x2   : > { %30 = dma.hbm_to_vmem [thread:$0] %s1, 64 }
   0x3   : > { %p5 = scmp.ge.s32.totalorder %s20, 1  ;;  %p6 = scmp.lt.s32.totalorder %s20, 5 }
   0x4   : > { %p7 = pnand %p5, %p6 }
   0x5   : > { %31 = sbr.rel (%p7) target = $region9 }
   0x6   : > { %s10 = smov.u32 0 }
   0x7 LB: >> { %v1 = vld [vmem:[%s1] sm:$0xff]  ;;  %32 = vmatpush3.bf16.msra.mxu0 %v1 }
   0x8   : >> { %s11 = sadd.s32 1, %s10  ;;  %33 = vmatmul.mubr.bf16.vlgmr.msra.gmra.mxu0 %v1 }
   0x9   : >> { %p12 = scmp.ge.s32.totalorder %s11, 2 /* loop exit test */ }
   0xa   : > { %34 = vst [vmem:[%s1] sm:$0xff] %v1 }
   0xb PF: > { %s21 = sadd.s32 1, %s20 } /* Start/End empty region 9 */
   0xc   : > { %p13 = scmp.ge.s32.totalorder %s21, 6 /* loop exit test */ }
   0xd   :  { %s14 = smov.u32 0 }
"""


def test_pipelined_grid_loop_runs_its_compute_stage_once_per_step():
    """The fill and drain iterations skip the guarded region: its bundles and the loops inside it
    count `steps` times, not the grid loop's steps + 2 trips."""
    kb = llo.parse_bundles(PIPELINED, "mm")
    grid, inner = kb.loops
    assert (grid.trips, grid.own_bundles, inner.trips, inner.parent) == (6, 9, 2, 0)
    # rows 0x6 and 0xa lie in the region (0x7-0x9 are the inner loop's); i in {1, 2, 3, 4} runs it
    assert grid.guarded == ((4, 2),) and inner.guard_runs == 4
    assert kb.executions(1) == (4 * 2, True)
    # 2 straight-line + grid: 7 bundles x 6 iterations + 2 x 4 + inner: 3 x 2 x 4
    assert kb.static_bundles() == (2 + 42 + 8 + 24, True)
    assert kb.issued_bundles(1, {}) == 2 + 42 + 8 + 24
    assert llo.KernelBundles.from_dict(kb.to_dict()) == kb  # stored and read back


def test_parse_bundles_rejects_other_text():
    with pytest.raises(ValueError, match="no bundles"):
        llo.parse_bundles("HloModule m\nENTRY e { ROOT x = f32[] constant(0) }", "m")


def test_issue_cycles_set_the_bound():
    base = Traffic(bytes_read=10**6, bytes_written=0, flops=10**6, grid_steps=1, dmas=1)
    kb = llo.parse_bundles(DUMP, "toy")
    fast = predict(base, "v6e")
    slow = predict(Traffic(**{**base.__dict__, "issue_cycles": kb.issued_bundles(1, {1: 10**5, 2: 10**6})}), "v6e")
    assert fast.bound == "memory" and slow.bound == "issue" and slow.seconds > fast.seconds


@pytest.mark.aot
def test_bundle_counts_from_a_real_compile(tmp_path):
    """quantized_matmul at a static grid: the grid loop is the software pipeline's (steps + 2
    trips), its compute stage runs once per step, twice the K steps issue about twice the bundles,
    and on v5p's megacore the dump is one core's program (half the steps, + 2)."""
    key = {"x_dtype": "bfloat16", "w_dtype": "int8", "act_quant": "none", "block_k": 0, "block_n": 1,
           "k": 1024, "n": 1024, "m": 16}
    block_sizes = {"tm": 16, "tn": 256, "tk": 512}
    counts = {}
    for k, steps in ((1024, 8), (2048, 16)):
        bundles = llo.kernel_bundles("quantized_matmul", {**key, "k": k}, block_sizes, "v5e", cache_dir=tmp_path)
        (kb,) = bundles.values()
        (grid,) = [lp for lp in kb.loops if lp.parent is None and lp.trips]
        assert grid.trips == steps + 2
        # the MXU work is the grid loop's own, in a region that runs `steps` of its iterations
        assert kb.loops[kb.compute_loop()] is grid and steps in [runs for runs, _ in grid.guarded]
        counts[k] = kb.static_bundles()[0]
        assert llo.cached_bundles("quantized_matmul", {**key, "k": k}, block_sizes, "v5e",
                                  cache_dir=tmp_path) == bundles  # stored: no second compile
    assert 1.6 < counts[2048] / counts[1024] < 2.4
    (kb,) = llo.kernel_bundles("quantized_matmul", key, block_sizes, "v5p", cache_dir=tmp_path).values()
    (grid,) = [lp for lp in kb.loops if lp.parent is None and lp.trips]
    assert grid.trips == 8 // 2 + 2  # 4 parallel N tiles: two per core


# A decode-size matmul's column loop: 3 bundles whose MXU result pop waits on the push (the region
# markers of the final bundles, and libtpu's critical-path pass for the same kernel).
STALLED = """\
     0   :  { %s1 = inlined_call_operand.vmem [shape: s32[8]] } /* entry bundle: %mv.1 = custom-call(%a) */
   0x1   :  { %s2 = smov.u32 0 } /* Start region 3 */
   0x2 LB: > { %v1 = vld [vmem:[%s1] sm:$0xff]  ;;  %10 = vmatpush1.bf16.msra.mxu0 %v1 } /* Start region 7 :: Start region 8 */
   0x3   : > { %11 = vmatmul.mubr.bf16.vlgmr.msra.gmra.mxu0 %v1 }
   0x4   : > { %v2 = vpop.f32.mrf.mxu0  ;;  %p7 = scmp.ge.s32.totalorder %s6, 4 /* loop exit test */ }
   0x5   :  { %s10 = smov.u32 0 }
"""
CRITICAL = """
New basic block in region: region3 {members=4 hlo=mv.1 parent=0}
  Length to end: 2, %s2 = smov.u32 0

New basic block in region: region7 {members=40 hlo=mv.1 parent=1}
  Length to end: 95, %v1 = vld [vmem:[%s1] sm:$0xff]
  Length to end: 94, %10 = vmatpush1.bf16.msra.mxu0 %v1

New basic block in region: region8 {members=2 hlo=mv.1 parent=1}
  Length to end: 1, %s5 = smov.u32 %s6 /* phi copy */
"""


def test_a_short_loop_body_stalls_for_its_critical_path():
    """A body of 3 bundles whose critical path is 95 cycles (the MXU's latency) takes 95 cycles an
    iteration: the 92-cycle stall counts per execution; without the critical-path dump, none."""
    critical = llo.parse_critical_paths(CRITICAL)
    assert critical == {3: 2, 7: 95, 8: 1}
    (loop,) = llo.parse_bundles(STALLED, "mv", critical).loops
    assert (loop.own_bundles, loop.trips, loop.stall) == (3, 4, 92)
    assert llo.parse_bundles(STALLED, "mv", critical).static_bundles() == (3 + 4 * 95, True)
    assert llo.parse_bundles(STALLED, "mv").static_bundles() == (3 + 4 * 3, True)
    # a body longer than its critical path hides the latency
    assert llo.parse_bundles(STALLED, "mv", {7: 2}).loops[0].stall == 0
