"""The LSTM gate cell as fused Triton kernels (GPU half of `mt.kernels`).

Same two functions, signatures, semantics and output dtypes as `reference.py`:

    cell_step(inp, c, weight, pre=None, bias=None) -> (h', c')            # one step, any K
    lstm_sequence(xproj, w_hh, lengths=None, h0=None, c0=None) -> (out, h_n, c_n)

Layout of this file (Liger-Kernel style): `@triton.jit` helpers and kernels first, then the Python
launchers, then the `torch.autograd.Function`s, then the public functions.

Kernels (one launch per LSTM step, gate order i, f, g, o as in PyTorch):
  `_cell_forward_kernel`        cell_step forward: gates = pre + inp @ W + bias, nonlinearities,
                                cell update, all fused; each program owns a (BLOCK_B, BLOCK_H) tile
                                and computes the 4 gate blocks of that tile, so the whole update
                                happens in registers.
  `_cell_backward_kernel`       cell_step backward: dgates and dc_prev from (dh', dc') and the saved
                                activations (elementwise). d inp = dgates @ W^T and d W = inp^T @
                                dgates are then two torch matmuls (fusing d inp would need whole
                                dgates rows per program, i.e. recomputing them for each K-tile).
  `_lstm_step_forward_kernel`   one time step of a whole layer, BOTH directions per launch (grid
                                axis 2 = direction), with length masks. Writes into preallocated
                                buffers, so the Python loop of T launches allocates nothing,
                                syncs nothing and can be captured in a CUDA graph.
  `_lstm_step_backward_kernel`  one step of backpropagation through time, both directions per
                                launch, fully fused: each program first computes its H-tile of the
                                recurrent gradient dh = dgates_{next} @ W_hh^T (a tl.dot over 4H,
                                reading the dgates the previous launch wrote), adds d out, then
                                does the gate backward for that tile. d W_hh is ONE batched matmul
                                over all steps after the loop.

Numerics: tl.dot accumulates in fp32; the gate maths and the cell state are fp32 (c_new is stored
in c's dtype for `cell_step`, fp32 for `lstm_sequence`); activations are saved in fp32. fp32
dots use TF32 where PyTorch lets cuDNN use it (`torch.backends.cudnn.allow_tf32`, on by default),
so an fp32 model on our cell does the arithmetic of the cuDNN LSTM it stands in for, and IEEE fp32
(matching the reference tightly) where that flag is off: `trainer.tf32=false`, or
`fp32_precision`'s override MT_TRITON_FP32_PRECISION=ieee|tf32|tf32x3. tanh is 2*sigmoid(2x)-1, which
is finite for any |x| (sigmoid(x) = 1/(1+exp(-x)) goes to 0 or 1, never NaN).

float64 inputs are not run by Triton: both functions fall back to the reference (fp64 is for
gradcheck, not for speed).

Triton interpreter (TRITON_INTERPRET=1, CPU tensors): in triton 3.6.0 the interpreter's tl.dot
returns garbage for bfloat16 operands (it multiplies the uint16 bit patterns; known upstream as
triton-lang/triton#11584, "not supported yet"), so on CPU the kernels upcast bf16/fp16 tiles to fp32
before tl.dot (`UPCAST_DOT`), and do no other arithmetic on 16-bit values (loads are cast to fp32). Products of two bf16/fp16 numbers are exact in fp32, so the result is the
same as the GPU's native bf16/fp16 dot with fp32 accumulation up to summation order.

Compiled variants: Triton compiles a kernel once per key (constexprs, dtypes, and whether each
int argument is 1 or divisible by 16), about a second each. The batch size B, the length T and
the launch index s vary from batch to batch and are `do_not_specialize`: they only bound masks
and loops (alignment comes from the constexpr H and the strides, which stay specialized), so a
new batch shape never compiles a kernel again unless its tile size (`batch_tile`) changes.
mt.train compiles a run's variants in parallel processes before its first step
(mt/precompile.py, mt/kernels/precompile.py).

Block sizes come from `_pick_blocks` (untuned heuristics: no GPU was available when this was
written); MT_TRITON_BLOCKS="BLOCK_B,BLOCK_H,BLOCK_K,num_warps" overrides them for tuning runs.
Offsets are int32: tensors must stay below 2**31 elements (B=256, H=1024, T=30, D=2 is 63M).
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference

FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")  # tl.dot's input_precision for fp32 operands


# ----------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    # exp(-x) overflows to inf for x << 0, giving 1/inf = 0: never NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2*sigmoid(2x) - 1: saturates to +-1 for large |x| instead of inf/inf = NaN.
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _gate_backward(dh, dc, i, f, g, o, c_prev):
    """Backward of  c' = f*c + i*g ; h' = o*tanh(c')  through the gate nonlinearities.

    dh, dc: gradients w.r.t. h' and c'; i, f, g, o: activated gates; all (BLOCK_B, BLOCK_H) fp32.
    Returns the pre-activation gradients (dgate_i, dgate_f, dgate_g, dgate_o), the total gradient
    reaching c' (dc + the part through h') and dc_prev = that * f.
    """
    c_new = f * c_prev + i * g  # recomputed rather than saved
    tc = _tanh(c_new)
    dc_tot = dc + dh * o * (1.0 - tc * tc)  # d tanh(c') / dc' = 1 - tanh^2
    d_i = dc_tot * g * i * (1.0 - i)  # sigmoid' = s(1-s)
    d_f = dc_tot * c_prev * f * (1.0 - f)
    d_g = dc_tot * i * (1.0 - g * g)  # tanh' = 1 - tanh^2
    d_o = dh * tc * o * (1.0 - o)
    return d_i, d_f, d_g, d_o, dc_tot * f


# ----------------------------------------------------------------------------------------------
# cell_step kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gates_dot(
    x_ptr,  # (B, K) tile source, element (b, k) at x_ptr + b * stride_xb + k * stride_xk
    stride_xb,
    stride_xk,
    w_ptr,  # (K, 4H), element (k, n) at w_ptr + k * stride_wk + n * stride_wn
    stride_wk,
    stride_wn,
    offs_b,
    offs_h,
    mask_b,
    mask_h,
    K: tl.constexpr,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """x @ W for the same BLOCK_H columns of each of the four gate blocks: four fp32
    (BLOCK_B, BLOCK_H) accumulators i, f, g, o."""
    offs_k = tl.arange(0, BLOCK_K)
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(
            x_ptr + offs_b[:, None] * stride_xb + kk[None, :] * stride_xk,
            mask=mask_b[:, None] & mask_k[None, :],
            other=0.0,
        )  # (BLOCK_B, BLOCK_K)
        w_tile = w_ptr + kk[:, None] * stride_wk + offs_h[None, :] * stride_wn  # gate i columns
        mask_w = mask_k[:, None] & mask_h[None, :]
        w_i = tl.load(w_tile, mask=mask_w, other=0.0).to(x.dtype)  # (BLOCK_K, BLOCK_H)
        w_f = tl.load(w_tile + H * stride_wn, mask=mask_w, other=0.0).to(x.dtype)
        w_g = tl.load(w_tile + 2 * H * stride_wn, mask=mask_w, other=0.0).to(x.dtype)
        w_o = tl.load(w_tile + 3 * H * stride_wn, mask=mask_w, other=0.0).to(x.dtype)
        if UPCAST_DOT:
            x = x.to(tl.float32)
            w_i, w_f, w_g, w_o = (
                w_i.to(tl.float32),
                w_f.to(tl.float32),
                w_g.to(tl.float32),
                w_o.to(tl.float32),
            )
        acc_i = tl.dot(x, w_i, acc_i, input_precision=INPUT_PRECISION)
        acc_f = tl.dot(x, w_f, acc_f, input_precision=INPUT_PRECISION)
        acc_g = tl.dot(x, w_g, acc_g, input_precision=INPUT_PRECISION)
        acc_o = tl.dot(x, w_o, acc_o, input_precision=INPUT_PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _add_gate_blocks(acc_i, acc_f, acc_g, acc_o, p, stride_n, mask, H: tl.constexpr):
    """acc += the four H-blocks of a (., 4H) row tile; p points at gate i's tile."""
    acc_i += tl.load(p, mask=mask, other=0.0).to(tl.float32)
    acc_f += tl.load(p + H * stride_n, mask=mask, other=0.0).to(tl.float32)
    acc_g += tl.load(p + 2 * H * stride_n, mask=mask, other=0.0).to(tl.float32)
    acc_o += tl.load(p + 3 * H * stride_n, mask=mask, other=0.0).to(tl.float32)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _load_gate_blocks(a, mask, H: tl.constexpr):
    """Load the four H-blocks i, f, g, o of a contiguous (., 4H) tile (saved activations)."""
    i = tl.load(a, mask=mask, other=0.0)
    f = tl.load(a + H, mask=mask, other=0.0)
    g = tl.load(a + 2 * H, mask=mask, other=0.0)
    o = tl.load(a + 3 * H, mask=mask, other=0.0)
    return i, f, g, o


@triton.jit
def _store_gate_blocks(a, i, f, g, o, mask, H: tl.constexpr):
    """Store i, f, g, o (activated gates or their gradients) into the four H-blocks of a
    contiguous (., 4H) tile."""
    tl.store(a, i, mask=mask)
    tl.store(a + H, f, mask=mask)
    tl.store(a + 2 * H, g, mask=mask)
    tl.store(a + 3 * H, o, mask=mask)


@triton.jit(do_not_specialize=["B"])  # see "Compiled variants" in the module docstring
def _cell_forward_kernel(
    inp_ptr,  # (B, K)
    w_ptr,  # (K, 4H), any strides (often a transposed view)
    pre_ptr,  # (B, 4H) or dummy
    bias_ptr,  # (4H,) or dummy
    c_ptr,  # (B, H)
    h_out_ptr,  # (B, H) in inp's dtype
    c_out_ptr,  # (B, H) in c's dtype
    act_ptr,  # (B, 4H) fp32, contiguous: activated i, f, g, o saved for backward
    B,
    K: tl.constexpr,  # constexpr: loop bounds (the interpreter cannot range() over a runtime int)
    H: tl.constexpr,
    stride_ib,
    stride_ik,
    stride_wk,
    stride_wn,
    stride_pb,
    stride_pn,
    stride_bn,
    stride_cb,
    stride_ch,
    HAS_PRE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_ACT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,) columns inside one gate block
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_bh = mask_b[:, None] & mask_h[None, :]

    # gates = inp @ W, the four H-blocks of this tile in four fp32 accumulators
    acc_i, acc_f, acc_g, acc_o = _gates_dot(
        inp_ptr,
        stride_ib,
        stride_ik,
        w_ptr,
        stride_wk,
        stride_wn,
        offs_b,
        offs_h,
        mask_b,
        mask_h,
        K,
        H,
        BLOCK_B,
        BLOCK_H,
        BLOCK_K,
        INPUT_PRECISION,
        UPCAST_DOT,
    )

    if HAS_PRE:  # + pre (B, 4H)
        p = pre_ptr + offs_b[:, None] * stride_pb + offs_h[None, :] * stride_pn
        acc_i, acc_f, acc_g, acc_o = _add_gate_blocks(acc_i, acc_f, acc_g, acc_o, p, stride_pn, mask_bh, H)
    if HAS_BIAS:  # + bias (4H,), the same row for every b
        bp = bias_ptr + offs_b[:, None] * 0 + offs_h[None, :] * stride_bn
        acc_i, acc_f, acc_g, acc_o = _add_gate_blocks(acc_i, acc_f, acc_g, acc_o, bp, stride_bn, mask_bh, H)

    i = _sigmoid(acc_i)  # (BLOCK_B, BLOCK_H)
    f = _sigmoid(acc_f)
    g = _tanh(acc_g)
    o = _sigmoid(acc_o)
    c_prev = tl.load(c_ptr + offs_b[:, None] * stride_cb + offs_h[None, :] * stride_ch, mask=mask_bh, other=0.0).to(
        tl.float32
    )
    c_new = f * c_prev + i * g  # the conveyor belt
    h_new = o * _tanh(c_new)

    out_bh = offs_b[:, None] * H + offs_h[None, :]  # h_out, c_out are contiguous (B, H)
    tl.store(h_out_ptr + out_bh, h_new.to(h_out_ptr.dtype.element_ty), mask=mask_bh)
    tl.store(c_out_ptr + out_bh, c_new.to(c_out_ptr.dtype.element_ty), mask=mask_bh)
    if STORE_ACT:  # only when a backward will need them
        a = act_ptr + offs_b[:, None] * (4 * H) + offs_h[None, :]  # act is contiguous (B, 4H)
        _store_gate_blocks(a, i, f, g, o, mask_bh, H)


@triton.jit(do_not_specialize=["B"])
def _cell_backward_kernel(
    dh_ptr,  # (B, H) grad of h', or dummy
    dc_ptr,  # (B, H) grad of c', or dummy
    act_ptr,  # (B, 4H) fp32 contiguous, saved i, f, g, o
    c_ptr,  # (B, H) c (the input cell state)
    dgates_ptr,  # (B, 4H) contiguous, out: pre-activation gradients
    dc_prev_ptr,  # (B, H) contiguous, out: grad of c
    B,
    H,
    stride_dhb,
    stride_dhh,
    stride_dcb,
    stride_dch,
    stride_cb,
    stride_ch,
    HAS_DH: tl.constexpr,
    HAS_DC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (offs_b < B)[:, None] & (offs_h < H)[None, :]

    if HAS_DH:
        dh = tl.load(
            dh_ptr + offs_b[:, None] * stride_dhb + offs_h[None, :] * stride_dhh,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
    else:
        dh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_DC:
        dc = tl.load(
            dc_ptr + offs_b[:, None] * stride_dcb + offs_h[None, :] * stride_dch,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
    else:
        dc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    a = act_ptr + offs_b[:, None] * (4 * H) + offs_h[None, :]
    i, f, g, o = _load_gate_blocks(a, mask, H)
    c_prev = tl.load(c_ptr + offs_b[:, None] * stride_cb + offs_h[None, :] * stride_ch, mask=mask, other=0.0).to(
        tl.float32
    )

    d_i, d_f, d_g, d_o, dc_prev = _gate_backward(dh, dc, i, f, g, o, c_prev)

    dg = dgates_ptr + offs_b[:, None] * (4 * H) + offs_h[None, :]
    ty = dgates_ptr.dtype.element_ty
    _store_gate_blocks(dg, d_i.to(ty), d_f.to(ty), d_g.to(ty), d_o.to(ty), mask, H)
    tl.store(
        dc_prev_ptr + offs_b[:, None] * H + offs_h[None, :],
        dc_prev.to(dc_prev_ptr.dtype.element_ty),
        mask=mask,
    )


# ----------------------------------------------------------------------------------------------
# lstm_sequence kernels
#
# Buffers (allocated once per call, before the loop; D directions, T steps):
#   hbuf (D, T+2, B, H) xproj dtype   h state; slot t+1 holds the state GOING INTO step t, for both
#   cbuf (D, T+2, B, H) fp32          directions. Direction 0 writes the state after step t to
#                                     slot t+2, direction 1 (reversed) to slot t. So h0 sits in
#                                     slot 1 (d=0) / T (d=1) and h_n in slot T+1 (d=0) / 0 (d=1),
#                                     and hbuf[:, 1:T+1] is h_{t-1} for every step t: the left
#                                     operand of the single d W_hh matmul.
#   act  (D, T, B, 4H) fp32           activated gates of step t
#   out  (D, B, T, H) xproj dtype     output (zeros at padded steps)
#   dG   (D, T, B, 4H) xproj dtype    pre-activation gradients = d xproj (permuted view)
#   gbuf, cbwd (D, B, H) fp32         gradients w.r.t. the h and c state being carried back
# Launch s (0..T-1) processes step t = s in direction 0 and t = T-1-s in direction 1.
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["s", "T", "B"])
def _lstm_step_forward_kernel(
    xproj_ptr,  # (D, B, T, 4H) any strides: the precomputed input part of the gates
    w_ptr,  # (D, H, 4H) any strides: W_hh per direction
    hbuf_ptr,  # (D, T+2, B, H) contiguous
    cbuf_ptr,  # (D, T+2, B, H) contiguous fp32
    out_ptr,  # (D, B, T, H) contiguous
    act_ptr,  # (D, T, B, 4H) contiguous fp32
    len_ptr,  # (B,) int32, or dummy
    s,  # launch index
    T,
    B,
    H: tl.constexpr,  # constexpr: loop bound (see _cell_forward_kernel)
    stride_xd,
    stride_xb,
    stride_xt,
    stride_xn,
    stride_wd,
    stride_wk,
    stride_wn,
    HAS_LENGTHS: tl.constexpr,
    STORE_ACT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    d = tl.program_id(2)  # direction
    t = s + d * (T - 1 - 2 * s)  # d=0: s, d=1: T-1-s
    slot_in = t + 1
    slot_out = t + 2 - 2 * d

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_bh = mask_b[:, None] & mask_h[None, :]
    if HAS_LENGTHS:
        length = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
        valid = (t < length)[:, None]  # (BLOCK_B, 1): padded steps keep the state
    else:
        valid = tl.full((BLOCK_B, 1), 1, tl.int1)

    plane = B * H  # one (B, H) slot of hbuf / cbuf
    h_base = hbuf_ptr + (d * (T + 2) + slot_in) * plane  # h_{t-1}: (B, H)
    w_base = w_ptr + d * stride_wd

    # gates = h_{t-1} @ W_hh: four (BLOCK_B, BLOCK_H) fp32 accumulators
    acc_i, acc_f, acc_g, acc_o = _gates_dot(
        h_base,
        H,
        1,
        w_base,
        stride_wk,
        stride_wn,
        offs_b,
        offs_h,
        mask_b,
        mask_h,
        H,
        H,
        BLOCK_B,
        BLOCK_H,
        BLOCK_K,
        INPUT_PRECISION,
        UPCAST_DOT,
    )

    # + xproj[d, :, t]  (B, 4H)
    p = xproj_ptr + d * stride_xd + t * stride_xt + offs_b[:, None] * stride_xb
    p = p + offs_h[None, :] * stride_xn
    acc_i, acc_f, acc_g, acc_o = _add_gate_blocks(acc_i, acc_f, acc_g, acc_o, p, stride_xn, mask_bh, H)

    i = _sigmoid(acc_i)
    f = _sigmoid(acc_f)
    g = _tanh(acc_g)
    o = _sigmoid(acc_o)
    bh = offs_b[:, None] * H + offs_h[None, :]  # (BLOCK_B, BLOCK_H) offsets inside one slot
    c_prev = tl.load(cbuf_ptr + (d * (T + 2) + slot_in) * plane + bh, mask=mask_bh, other=0.0)
    h_prev = tl.load(h_base + bh, mask=mask_bh, other=0.0)
    c_new = f * c_prev + i * g
    h_new = (o * _tanh(c_new)).to(hbuf_ptr.dtype.element_ty)

    # state after the step (unchanged on padded steps), written to a different slot than it was
    # read from: no program reads what another one writes in the same launch
    out_slot = (d * (T + 2) + slot_out) * plane
    tl.store(hbuf_ptr + out_slot + bh, tl.where(valid, h_new, h_prev), mask=mask_bh)
    tl.store(cbuf_ptr + out_slot + bh, tl.where(valid, c_new, c_prev), mask=mask_bh)
    out = out_ptr + ((d * B + offs_b[:, None]) * T + t) * H + offs_h[None, :]
    tl.store(out, tl.where(valid, h_new, 0.0).to(out_ptr.dtype.element_ty), mask=mask_bh)
    if STORE_ACT:  # only when a backward will need them
        a = act_ptr + ((d * T + t) * B + offs_b[:, None]) * (4 * H) + offs_h[None, :]
        _store_gate_blocks(a, i, f, g, o, mask_bh, H)


@triton.jit(do_not_specialize=["s", "T", "B"])
def _lstm_step_backward_kernel(
    dgates_ptr,  # (D, T, B, 4H) contiguous, xproj dtype: written at step t, read at step t_next
    w_ptr,  # (D, H, 4H) any strides
    act_ptr,  # (D, T, B, 4H) contiguous fp32
    cbuf_ptr,  # (D, T+2, B, H) contiguous fp32
    dout_ptr,  # (D, B, T, H) any strides, or dummy
    gbuf_ptr,  # (D, B, H) contiguous fp32: grad w.r.t. the h state after step t (carried)
    cbwd_ptr,  # (D, B, H) contiguous fp32: grad w.r.t. the c state after step t (carried)
    len_ptr,  # (B,) int32, or dummy
    s,  # launch index of the forward step being undone
    T,
    B,
    H: tl.constexpr,  # constexpr: loop bound (see _cell_forward_kernel)
    stride_wd,
    stride_wk,
    stride_wn,
    stride_od,
    stride_ob,
    stride_ot,
    stride_oh,
    HAS_LENGTHS: tl.constexpr,
    HAS_DOUT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    d = tl.program_id(2)
    t = s + d * (T - 1 - 2 * s)
    t_next = t + 1 - 2 * d  # the step that ran after t in the forward pass (undone just before)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_bh = mask_b[:, None] & mask_h[None, :]
    bh = offs_b[:, None] * H + offs_h[None, :]
    state = gbuf_ptr + d * B * H + bh  # this program's tile of gbuf / cbwd
    cstate = cbwd_ptr + d * B * H + bh
    if HAS_LENGTHS:
        length = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
        valid = (t < length)[:, None]
    else:
        valid = tl.full((BLOCK_B, 1), 1, tl.int1)

    # G = d loss / d h_t (the state after step t). If step t_next was a real step, h_t fed its
    # gates: G = dgates_{t_next} @ W_hh^T (this tile's H columns; a dot over 4H). If it was padded,
    # h_t passed through it unchanged: G is the carried gbuf.
    G = tl.load(state, mask=mask_bh, other=0.0)  # (BLOCK_B, BLOCK_H)
    if s != T - 1:  # the last forward step (the first launch) has no later step to take dh from
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        dg_base = dgates_ptr + ((d * T + t_next) * B + offs_b[:, None]) * (4 * H)
        w_base = w_ptr + d * stride_wd
        for k0 in range(0, 4 * H, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < 4 * H
            dg = tl.load(dg_base + kk[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_B, BLOCK_K)
            wt = tl.load(
                w_base + kk[:, None] * stride_wn + offs_h[None, :] * stride_wk,
                mask=mask_k[:, None] & mask_h[None, :],
                other=0.0,
            ).to(dg.dtype)  # (BLOCK_K, BLOCK_H) tile of W_hh^T
            if UPCAST_DOT:
                dg = dg.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(dg, wt, acc, input_precision=INPUT_PRECISION)
        if HAS_LENGTHS:
            valid_next = (t_next < length)[:, None]
            G = tl.where(valid_next, acc, G)
        else:
            G = acc
    dh = G
    if HAS_DOUT:
        dh = G + tl.load(
            dout_ptr + d * stride_od + t * stride_ot + offs_b[:, None] * stride_ob + offs_h[None, :] * stride_oh,
            mask=mask_bh,
            other=0.0,
        ).to(tl.float32)
    dc = tl.load(cstate, mask=mask_bh, other=0.0)

    a = act_ptr + ((d * T + t) * B + offs_b[:, None]) * (4 * H) + offs_h[None, :]
    i, f, g, o = _load_gate_blocks(a, mask_bh, H)
    c_prev = tl.load(cbuf_ptr + (d * (T + 2) + t + 1) * (B * H) + bh, mask=mask_bh, other=0.0)

    d_i, d_f, d_g, d_o, dc_prev = _gate_backward(dh, dc, i, f, g, o, c_prev)

    # padded step: no gate gradient, the state gradients pass through unchanged
    ty = dgates_ptr.dtype.element_ty
    dgp = dgates_ptr + ((d * T + t) * B + offs_b[:, None]) * (4 * H) + offs_h[None, :]
    _store_gate_blocks(
        dgp,
        tl.where(valid, d_i, 0.0).to(ty),
        tl.where(valid, d_f, 0.0).to(ty),
        tl.where(valid, d_g, 0.0).to(ty),
        tl.where(valid, d_o, 0.0).to(ty),
        mask_bh,
        H,
    )
    # gbuf keeps G: the next launch uses it only if this step was padded
    tl.store(state, G, mask=mask_bh)
    tl.store(cstate, tl.where(valid, dc_prev, dc), mask=mask_bh)


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def batch_tile(B: int) -> int:
    """BLOCK_B, the rows of a batch of B sentences one program handles (16, 32 or 64): the only
    kernel constexpr that changes with the batch, so batches of one tile share their variants."""
    override = os.environ.get("MT_TRITON_BLOCKS")
    if override:
        return int(override.split(",")[0])
    return min(max(_next_pow2(B), 16), 64)


def _pick_blocks(B: int, H: int, K: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps). Untuned heuristics; tl.dot needs every dim >= 16.

    GPU: small H-tiles so that even B=64 gives enough programs to spread over the SMs (a step is
    latency-bound). Interpreter: big tiles, because each program costs Python time.
    """
    override = os.environ.get("MT_TRITON_BLOCKS")
    if override:
        bb, bh, bk, nw = (int(v) for v in override.split(","))
        return bb, bh, bk, nw
    if device.type != "cuda":
        return (
            batch_tile(B),
            min(max(_next_pow2(H), 16), 64),
            min(max(_next_pow2(K), 16), 128),
            4,
        )
    block_b = batch_tile(B)
    block_h = 32 if H >= 32 else 16
    block_k = min(max(_next_pow2(K), 16), 64)
    return block_b, block_h, block_k, 4


def fp32_precision() -> str:
    """How the kernels' fp32 dots run, read at every launch: MT_TRITON_FP32_PRECISION if set, else
    "tf32" when PyTorch allows cuDNN TF32 (`torch.backends.cudnn.allow_tf32`, its default) and
    "ieee" when not. (Each value is its own compiled variant; the interpreter computes all in fp32.)"""
    override = os.environ.get("MT_TRITON_FP32_PRECISION")
    if override:
        if override not in FP32_PRECISIONS:
            raise ValueError(f"MT_TRITON_FP32_PRECISION={override!r}: use one of {', '.join(FP32_PRECISIONS)}")
        return override
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def _precision(dtype: torch.dtype) -> str:
    return fp32_precision() if dtype == torch.float32 else "ieee"


def _upcast(device: torch.device) -> bool:
    # the CPU interpreter mis-computes bf16 tl.dot (see the module docstring)
    return device.type != "cuda"


def _grad_needed(*tensors) -> bool:
    """Will autograd record this call? If not (inference, no_grad), the forward kernels skip
    saving activations. (ctx.needs_input_grad cannot tell: it ignores no_grad.)"""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_triton_device(t: Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the Triton gate cell needs CUDA tensors, or TRITON_INTERPRET=1 (set before importing "
            "triton) for CPU tensors"
        )


def _cell_forward(inp, c, weight, pre, bias, store_act=True):
    """Launch `_cell_forward_kernel`. Returns h' (B, H), c' (B, H), act (B, 4H) fp32
    (act is a 1-element dummy when store_act is False: inference needs no saved gates)."""
    B, K = inp.shape
    H = c.shape[1]
    h_new = torch.empty(B, H, device=inp.device, dtype=inp.dtype)
    c_new = torch.empty(B, H, device=inp.device, dtype=c.dtype)
    act_shape = (B, 4 * H) if store_act else (1, 1)
    act = torch.empty(act_shape, device=inp.device, dtype=torch.float32)
    bb, bh, bk, nw = _pick_blocks(B, H, K, inp.device)
    grid = (triton.cdiv(B, bb), triton.cdiv(H, bh))
    pre_t = pre if pre is not None else act  # dummy pointer, never read
    bias_t = bias if bias is not None else act
    _cell_forward_kernel[grid](
        inp,
        weight,
        pre_t,
        bias_t,
        c,
        h_new,
        c_new,
        act,
        B,
        K,
        H,
        inp.stride(0),
        inp.stride(1),
        weight.stride(0),
        weight.stride(1),
        pre_t.stride(0),
        pre_t.stride(1),
        bias_t.stride(0),
        c.stride(0),
        c.stride(1),
        HAS_PRE=pre is not None,
        HAS_BIAS=bias is not None,
        STORE_ACT=store_act,
        BLOCK_B=bb,
        BLOCK_H=bh,
        BLOCK_K=bk,
        INPUT_PRECISION=_precision(inp.dtype),
        UPCAST_DOT=_upcast(inp.device),
        num_warps=nw,
    )
    return h_new, c_new, act


def _cell_backward(dh, dc, act, c, gate_dtype):
    """Launch `_cell_backward_kernel`. Returns dgates (B, 4H) in gate_dtype, dc_prev (B, H) fp32."""
    B, H = c.shape
    dgates = torch.empty(B, 4 * H, device=c.device, dtype=gate_dtype)
    dc_prev = torch.empty(B, H, device=c.device, dtype=torch.float32)
    bb, bh, _, nw = _pick_blocks(B, H, H, c.device)
    grid = (triton.cdiv(B, bb), triton.cdiv(H, bh))
    dh_t = dh if dh is not None else dc_prev  # dummies, never read
    dc_t = dc if dc is not None else dc_prev
    _cell_backward_kernel[grid](
        dh_t,
        dc_t,
        act,
        c,
        dgates,
        dc_prev,
        B,
        H,
        dh_t.stride(0),
        dh_t.stride(1),
        dc_t.stride(0),
        dc_t.stride(1),
        c.stride(0),
        c.stride(1),
        HAS_DH=dh is not None,
        HAS_DC=dc is not None,
        BLOCK_B=bb,
        BLOCK_H=bh,
        num_warps=nw,
    )
    return dgates, dc_prev


# ----------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------


class DeferredWeightGrad:
    """A step loop's weight (and bias) gradient as one matmul after the loop, not one per step.

    A decoder calls `cell_step` T times with the same weight (K, 4H). Autograd would compute
    inp_t^T @ dgates_t at every step (a skinny matmul over the batch: (K, B) @ (B, 4H)) and add
    the T results up, T matmuls and T - 1 additions of a (K, 4H) tensor. Instead:

        bank = DeferredWeightGrad()
        w, b = bank.attach(weight, bias)            # before the loop (bias may be None)
        for t ...: cell_step(inp_t, c, w, bias=b, bank=bank)

    Each step's backward leaves (inp_t, dgates_t) in the bank and returns no weight or bias
    gradient; the node `attach` made, which autograd runs after every step's backward (every
    step uses its outputs), computes d weight = [inp_1; ...; inp_T]^T @ [dgates_1; ...; dgates_T]
    (one matmul over all T * B rows, accumulated in fp32 inside it) and d bias = the column sums.
    Gradients that reach w or b another way (the reference cell, which ignores the bank) are
    added to them. A bank is attached once (one loop, one forward pass); `cell_step` refuses a
    weight or bias that is not the bank's (its gradient would be lost). A backward that does not
    want the weight's gradient (`torch.autograd.grad(..., inputs=...)` without it) leaves
    nothing in the bank.
    """

    def __init__(self) -> None:
        self.inps: list[Tensor] = []
        self.dgates: list[Tensor] = []
        self._node = None  # the aliases' backward node, once attached
        self._aliases: tuple = ()  # weak references to the aliases (no cycle through autograd's ctx)

    def attach(self, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Aliases of weight and bias whose gradients this bank computes (once per bank)."""
        if self._node is not None:
            raise RuntimeError("DeferredWeightGrad.attach: a bank is attached once (one per step loop)")
        w, b = _DeferredWeightFunction.apply(self, weight, bias if bias is not None else weight.new_empty(0))
        b = b if bias is not None else None
        self._node = w.grad_fn
        self._aliases = (weakref.ref(w), None if b is None else weakref.ref(b))
        return w, b

    def check(self, weight: Tensor, bias: Tensor | None) -> None:
        """Raise unless weight and bias are this bank's aliases (bias None if it has none)."""
        w_ref, b_ref = self._aliases or (None, None)
        if (
            w_ref is None
            or weight is not w_ref()
            or (bias is None) != (b_ref is None)
            or (bias is not None and bias is not b_ref())
        ):
            raise ValueError("cell_step(bank=...): weight and bias must be the ones bank.attach returned")

    def wanted(self) -> bool:
        """In a backward pass: will autograd run the aliases' node (is the weight's gradient wanted)?"""
        will_run = getattr(torch._C, "_will_engine_execute_node", None)  # (what torch.utils.checkpoint asks)
        return self._node is not None and (will_run is None or will_run(self._node))

    def add(self, inp: Tensor, dgates: Tensor) -> None:
        self.inps.append(inp)
        self.dgates.append(dgates)


class _DeferredWeightFunction(torch.autograd.Function):
    """`DeferredWeightGrad.attach`: forward, aliases; backward, the bank's matmul and sum."""

    @staticmethod
    def forward(ctx, bank, weight, bias):
        ctx.bank, ctx.w_dtype, ctx.b_dtype, ctx.has_bias = bank, weight.dtype, bias.dtype, bias.numel() > 0
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), bias.view_as(bias)

    @staticmethod
    def backward(ctx, d_weight, d_bias):
        bank = ctx.bank
        if bank.inps:
            inp = torch.cat(bank.inps)  # (T*B, K)
            dgates = torch.cat(bank.dgates)  # (T*B, 4H)
            bank.inps.clear()  # (the bank's tensors are freed with the graph's other saved ones)
            bank.dgates.clear()
            d_w = (inp.t() @ dgates).to(ctx.w_dtype)  # (K, 4H)
            d_weight = d_w if d_weight is None else d_weight + d_w
            if ctx.has_bias:
                d_b = dgates.sum(0, dtype=torch.float32).to(ctx.b_dtype)  # (4H,)
                d_bias = d_b if d_bias is None else d_bias + d_b
        return None, d_weight, (d_bias if ctx.has_bias else None)


class _CellStepFunction(torch.autograd.Function):
    """One fused step. Backward: `_cell_backward_kernel`, then d inp = dgates @ W^T and
    d W = inp^T @ dgates as torch matmuls (not fused), d pre = dgates, d bias = dgates.sum(0);
    with a `DeferredWeightGrad` bank, d W and d bias are left to it (one matmul after the loop)."""

    @staticmethod
    def forward(ctx, inp, c, weight, pre, bias, store_act, bank):
        h_new, c_new, act = _cell_forward(inp, c, weight, pre, bias, store_act)
        ctx.save_for_backward(inp, c, weight, act)
        ctx.bank = bank
        ctx.has_pre, ctx.has_bias = pre is not None, bias is not None
        ctx.pre_dtype = pre.dtype if pre is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)
        return h_new, c_new

    @staticmethod
    def backward(ctx, dh, dc):
        inp, c, weight, act = ctx.saved_tensors
        d_inp = d_c = d_w = d_pre = d_bias = None
        if dh is None and dc is None:
            return d_inp, d_c, d_w, d_pre, d_bias, None, None
        # dgates in inp's dtype: the dtype of the forward matmul, as in the reference
        dgates, dc_prev = _cell_backward(dh, dc, act, c, inp.dtype)  # (B, 4H), (B, H)
        need = ctx.needs_input_grad
        if need[0]:
            d_inp = dgates @ weight.to(inp.dtype).t()  # (B, K)
        if need[1]:
            d_c = dc_prev.to(c.dtype)
        if ctx.has_pre and need[3]:
            d_pre = dgates.to(ctx.pre_dtype)
        if ctx.bank is not None:  # d W and d bias: one matmul and one sum after the loop
            if ctx.bank.wanted():
                ctx.bank.add(inp, dgates)
            return d_inp, d_c, None, d_pre, None, None, None
        if need[2]:
            d_w = (inp.t() @ dgates).to(weight.dtype)  # (K, 4H)
        if ctx.has_bias and need[4]:
            d_bias = dgates.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return d_inp, d_c, d_w, d_pre, d_bias, None, None


class _LSTMSequenceFunction(torch.autograd.Function):
    """A whole layer (both directions) under one autograd node: T launches forward, T backward.

    h0 arrives already in xproj's dtype and c0 in fp32 (the public wrapper converts them);
    store_act is False when autograd will not record the call (the gates are then not saved).
    """

    @staticmethod
    def forward(ctx, xproj, w_hh, lengths, h0, c0, store_act):
        D, B, T, G = xproj.shape
        H = G // 4
        dev, dtype = xproj.device, xproj.dtype
        hbuf = torch.empty(D, T + 2, B, H, device=dev, dtype=dtype)  # (D, T+2, B, H)
        cbuf = torch.empty(D, T + 2, B, H, device=dev, dtype=torch.float32)
        out = torch.empty(D, B, T, H, device=dev, dtype=dtype)  # (D, B, T, H)
        act_shape = (D, T, B, 4 * H) if store_act else (1, 1, 1, 1)
        act = torch.empty(act_shape, device=dev, dtype=torch.float32)  # (D, T, B, 4H)
        in_slots = [1, T][:D]  # slot of the initial state per direction
        for d, slot in enumerate(in_slots):
            if h0 is None:
                hbuf[d, slot].zero_()
            else:
                hbuf[d, slot].copy_(h0[d])
            if c0 is None:
                cbuf[d, slot].zero_()
            else:
                cbuf[d, slot].copy_(c0[d])
        len_t = lengths if lengths is not None else cbuf  # dummy pointer, never read
        bb, bh, bk, nw = _pick_blocks(B, H, H, dev)
        grid = (triton.cdiv(B, bb), triton.cdiv(H, bh), D)
        prec, upcast = _precision(dtype), _upcast(dev)
        for s in range(T):  # no allocation, no host sync: capturable in a CUDA graph
            _lstm_step_forward_kernel[grid](
                xproj,
                w_hh,
                hbuf,
                cbuf,
                out,
                act,
                len_t,
                s,
                T,
                B,
                H,
                xproj.stride(0),
                xproj.stride(1),
                xproj.stride(2),
                xproj.stride(3),
                w_hh.stride(0),
                w_hh.stride(1),
                w_hh.stride(2),
                HAS_LENGTHS=lengths is not None,
                STORE_ACT=store_act,
                BLOCK_B=bb,
                BLOCK_H=bh,
                BLOCK_K=bk,
                INPUT_PRECISION=prec,
                UPCAST_DOT=upcast,
                num_warps=nw,
            )
        final_slots = [T + 1, 0][:D]
        h_n = torch.stack([hbuf[d, slot] for d, slot in enumerate(final_slots)])  # (D, B, H)
        c_n = torch.stack([cbuf[d, slot] for d, slot in enumerate(final_slots)])  # (D, B, H)
        ctx.save_for_backward(w_hh, lengths, hbuf, cbuf, act)
        ctx.h0_dtype = h0.dtype if h0 is not None else None
        ctx.c0_dtype = c0.dtype if c0 is not None else None
        ctx.set_materialize_grads(False)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        w_hh, lengths, hbuf, cbuf, act = ctx.saved_tensors
        D, T, B, G = act.shape
        H = G // 4
        dev, dtype = hbuf.device, hbuf.dtype
        dgates = torch.empty(D, T, B, G, device=dev, dtype=dtype)  # (D, T, B, 4H)
        gbuf = torch.zeros(D, B, H, device=dev, dtype=torch.float32)  # d h_n, carried back
        cbwd = torch.zeros(D, B, H, device=dev, dtype=torch.float32)  # d c_n, carried back
        if dh_n is not None:
            gbuf.copy_(dh_n)
        if dc_n is not None:
            cbwd.copy_(dc_n)
        dout_t = dout if dout is not None else act  # dummy pointer, never read
        len_t = lengths if lengths is not None else act
        bb, bh, bk, nw = _pick_blocks(B, H, G, dev)
        grid = (triton.cdiv(B, bb), triton.cdiv(H, bh), D)
        prec, upcast = _precision(dtype), _upcast(dev)
        for s in range(T - 1, -1, -1):
            _lstm_step_backward_kernel[grid](
                dgates,
                w_hh,
                act,
                cbuf,
                dout_t,
                gbuf,
                cbwd,
                len_t,
                s,
                T,
                B,
                H,
                w_hh.stride(0),
                w_hh.stride(1),
                w_hh.stride(2),
                dout_t.stride(0),
                dout_t.stride(1),
                dout_t.stride(2),
                dout_t.stride(3),
                HAS_LENGTHS=lengths is not None,
                HAS_DOUT=dout is not None,
                BLOCK_B=bb,
                BLOCK_H=bh,
                BLOCK_K=bk,
                INPUT_PRECISION=prec,
                UPCAST_DOT=upcast,
                num_warps=nw,
            )
        need = ctx.needs_input_grad
        d_xproj = dgates.permute(0, 2, 1, 3) if need[0] else None  # (D, B, T, 4H) view
        d_w = None
        if need[1]:
            # ONE batched matmul over all steps: sum_t h_{t-1}^T @ dgates_t
            h_prev = hbuf[:, 1 : T + 1].reshape(D, T * B, H)  # (D, T*B, H)
            d_w = torch.bmm(h_prev.transpose(1, 2), dgates.reshape(D, T * B, G))  # (D, H, 4H)
            d_w = d_w.to(w_hh.dtype)
        d_h0 = d_c0 = None
        if need[3]:
            # the last step undone (t=0 forward, t=T-1 reverse) feeds h0 through W_hh
            last = dgates[0, 0][None] if D == 1 else torch.stack([dgates[0, 0], dgates[1, T - 1]])  # (D, B, 4H)
            d_h0 = torch.bmm(last, w_hh.to(dtype).transpose(1, 2)).float()  # (D, B, H)
            if lengths is not None:
                first_valid = torch.stack([lengths > 0, lengths > T - 1][:D])  # (D, B)
                d_h0 = torch.where(first_valid[..., None], d_h0, gbuf)
            d_h0 = d_h0.to(ctx.h0_dtype)
        if need[4]:
            d_c0 = cbwd.to(ctx.c0_dtype)
        return d_xproj, d_w, None, d_h0, d_c0, None


# ----------------------------------------------------------------------------------------------
# Public API (same as reference.py)
# ----------------------------------------------------------------------------------------------


def cell_step(
    inp: Tensor,
    c: Tensor,
    weight: Tensor,
    pre: Tensor | None = None,
    bias: Tensor | None = None,
    bank: DeferredWeightGrad | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step: inp (B, K) @ weight (K, 4H) + pre (B, 4H) + bias (4H,) -> (h', c').

    h' has inp's dtype, c' has c's dtype (as `reference.cell_step`). weight may be any strided
    view (e.g. `param.t()`). One kernel launch forward, one kernel + two matmuls backward (one
    with a `bank`: weight and bias are then the bank's, and their gradients one matmul after the
    loop). float64 falls back to the reference.
    """
    if inp.dtype == torch.float64:
        return reference.cell_step(inp, c, weight, pre=pre, bias=bias)
    _check_triton_device(inp)
    B, K = inp.shape
    H = c.shape[-1]
    if weight.shape != (K, 4 * H):
        raise ValueError(f"weight must be (K, 4H) = ({K}, {4 * H}), got {tuple(weight.shape)}")
    if pre is not None and pre.shape != (B, 4 * H):
        raise ValueError(f"pre must be (B, 4H) = ({B}, {4 * H}), got {tuple(pre.shape)}")
    if bias is not None and bias.shape != (4 * H,):
        raise ValueError(f"bias must be (4H,) = ({4 * H},), got {tuple(bias.shape)}")
    if bank is not None:
        bank.check(weight, bias)
    return _CellStepFunction.apply(inp, c, weight, pre, bias, _grad_needed(inp, c, weight, pre, bias), bank)


def lstm_sequence(
    xproj: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None = None,
    h0: Tensor | None = None,
    c0: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer over a whole sequence, D in {1, 2} directions; see `reference.lstm_sequence`.

    xproj (D, B, T, 4H), w_hh (D, H, 4H) (any strides), lengths (B,) (right padding), h0/c0
    (D, B, H). Returns out (D, B, T, H) and h_n (D, B, H) in xproj's dtype, c_n (D, B, H) fp32.
    Forward: T launches of `_lstm_step_forward_kernel`; backward: T launches of
    `_lstm_step_backward_kernel` + one bmm for d W_hh. float64 falls back to the reference.
    """
    if xproj.dtype == torch.float64:
        return reference.lstm_sequence(xproj, w_hh, lengths=lengths, h0=h0, c0=c0)
    _check_triton_device(xproj)
    D, B, T, G = xproj.shape
    if D not in (1, 2):
        raise ValueError("D is 1 (forward) or 2 (forward + reverse)")
    H = G // 4
    if G != 4 * H or w_hh.shape != (D, H, G):
        raise ValueError(f"w_hh must be (D, H, 4H) = ({D}, {H}, {G}), got {tuple(w_hh.shape)}")
    if lengths is not None:
        lengths = lengths.to(device=xproj.device, dtype=torch.int32)
    if h0 is not None:
        h0 = h0.to(xproj.dtype)
    if c0 is not None:
        c0 = c0.to(torch.float32)
    store_act = _grad_needed(xproj, w_hh, h0, c0)
    return _LSTMSequenceFunction.apply(xproj, w_hh, lengths, h0, c0, store_act)
