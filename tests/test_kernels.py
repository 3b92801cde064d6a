"""mt.kernels as a whole: the backend resolution, the variants the decoding kernels compile in
(the same for every batch size and source length), and every kernel compiled for sm_90 by the
real compiler. Each kernel module's own tests: test_triton_cell.py, test_decode_attention.py,
test_search_topk.py, test_search_greedy.py, test_search_beam.py.

Where there is no GPU the kernels run on CPU tensors through the Triton interpreter; on a GPU
machine the cases marked gpu run the compiled kernels on CUDA (tests/kernel_utils.py).
(The compile check runs in a subprocess without the interpreter.)
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from kernel_utils import interpreted, kernel_module, record_variants, run_without_interpreter

from mt import kernels
from mt.errors import MTError

pytest.importorskip("triton")


def test_resolve_backend():
    assert kernels.resolve_backend("auto", "cpu") == "torch"
    assert kernels.resolve_backend("torch", "cpu") == "torch"
    assert kernels.resolve_backend("triton", "cpu") == "triton"  # the interpreter here, or a GPU
    with pytest.raises(MTError, match="unknown gate-cell backend"):
        kernels.resolve_backend("cuda-magic", "cpu")


@interpreted
def test_decoding_variants_do_not_depend_on_batch_size_or_source_length(monkeypatch):
    """Greedy and beam search with our Triton cell over batches of other sizes and source lengths
    (3, 9 and 20 positions: three powers of two apart) launch the same kernel variants: a
    translation job or a validation compiles each decoding kernel once, not per length."""
    from mt.config import ModelConfig
    from mt.model import Seq2Seq
    from mt.search import beam_search, greedy_search

    search_beam = kernel_module("search_beam")
    decode_attention = kernel_module("decode_attention")
    search_greedy = kernel_module("search_greedy")
    search_topk = kernel_module("search_topk")
    decoding = [
        (decode_attention, "_attention_step_kernel"),
        (search_topk, "_log_softmax_topk_kernel"),
        (search_greedy, "_greedy_update_kernel"),
        (search_beam, "_beam_update_kernel"),
        (search_beam, "_gather_rows_kernel"),
        (search_beam, "_beam_backtrack_kernel"),
    ]
    keys = record_variants(monkeypatch, decoding)
    torch.manual_seed(0)
    cfg = ModelConfig(
        cell="triton",
        emb_dim=8,
        hidden_dim=8,
        enc_layers=1,
        dec_layers=2,
        attention="general",
        dropout=0.0,
        emb_dropout=0.0,
    )
    model = Seq2Seq(cfg, 30, 30, 0).eval()
    variants = {}
    for n, S in [(2, 3), (3, 9), (2, 20)]:
        g = torch.Generator().manual_seed(n * S)
        src = torch.randint(4, 30, (n, S), generator=g)
        src[:, -1] = 3
        src_len = torch.full((n,), S)
        keys.clear()
        greedy_search(model, src, src_len, 2, 3, max_len_a=0.0, max_len_b=3)
        beam_search(model, src, src_len, 2, 3, beam=2, max_len_a=0.0, max_len_b=3)
        variants[n, S] = frozenset(keys)
    names = {k[0] for k in next(iter(variants.values()))}
    assert names == {name for _, name in decoding}, names  # every decoding kernel ran...
    assert len(set(variants.values())) == 1, {s: len(v) for s, v in variants.items()}  # ...in the same variants


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mt.kernels import triton_cell as tc

    def build(kernel, ptrs, consts, num_warps=4):
        names = kernel.arg_names
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
        consts = {(names.index(k),): v for k, v in consts.items()}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
        assert k.asm.get("cubin"), kernel

    tiles = dict(BLOCK_B=64, BLOCK_H=32, BLOCK_K=64, INPUT_PRECISION="ieee", UPCAST_DOT=False)
    bf, f32 = "*bf16", "*fp32"
    build(tc._lstm_step_forward_kernel,
          dict(xproj_ptr=bf, w_ptr=bf, hbuf_ptr=bf, cbuf_ptr=f32, out_ptr=bf, act_ptr=f32,
               len_ptr="*i32"),
          dict(H=512, HAS_LENGTHS=True, STORE_ACT=True, **tiles))
    build(tc._lstm_step_backward_kernel,
          dict(dgates_ptr=bf, w_ptr=bf, act_ptr=f32, cbuf_ptr=f32, dout_ptr=bf, gbuf_ptr=f32,
               cbwd_ptr=f32, len_ptr="*i32"),
          dict(H=512, HAS_LENGTHS=True, HAS_DOUT=True, **tiles))
    build(tc._cell_forward_kernel,
          dict(inp_ptr=bf, w_ptr=bf, pre_ptr=bf, bias_ptr=bf, c_ptr=f32, h_out_ptr=bf,
               c_out_ptr=f32, act_ptr=f32),
          dict(K=1024, H=512, HAS_PRE=True, HAS_BIAS=True, STORE_ACT=True, **tiles))
    build(tc._cell_backward_kernel,
          dict(dh_ptr=bf, dc_ptr=f32, act_ptr=f32, c_ptr=f32, dgates_ptr=bf, dc_prev_ptr=f32),
          dict(HAS_DH=True, HAS_DC=True, BLOCK_B=64, BLOCK_H=32))
    from mt.kernels import search_beam as sb
    from mt.kernels import search_topk as st
    i64 = "*i64"
    for k in (1, 10, st.MAX_K):  # the chunked top-k at V = 8000 (the merge's warps as the wrapper picks them)
        split = triton.cdiv(8000, st.CHUNK)
        build(st._chunk_topk_kernel, dict(logits_ptr=bf, banned_ptr=i64, part_ptr=f32, cval_ptr=f32, ccol_ptr=i64),
              dict(NB=2, K=k, SPLIT=split, CHUNK=st.CHUNK), num_warps=1)
        block = triton.next_power_of_2(split * k)
        build(st._merge_topk_kernel, dict(part_ptr=f32, cval_ptr=f32, ccol_ptr=i64, bias_ptr=f32, val_ptr=f32,
                                          idx_ptr=i64),
              dict(K=k, SPLIT=split, HAS_BIAS=True, BLOCK_P=triton.next_power_of_2(split), BLOCK_M=block),
              num_warps=1 if block <= 512 else (4 if block <= 2048 else 8))
    for K in (1, 5, sb.MAX_BEAM):  # the beam bookkeeping (a launch uses one warp)
        build(sb._beam_update_kernel,
              dict(val_ptr=f32, col_ptr=i64, attn_ptr=bf, limit_ptr=i64, sent_ptr=i64, t_ptr=i64, lp_ptr="*fp64",
                   done_ptr="*i1", fin_score_ptr="*fp64", fin_logp_ptr=f32, fin_info_ptr=i64, scores_ptr=f32,
                   last_ptr=i64, rows_ptr=i64, tok_hist_ptr=i64, bp_hist_ptr=i64, attn_hist_ptr=f32),
              dict(K=K, NBEST=1, BLOCK_C=triton.next_power_of_2(2 * K * K), BLOCK_2K=triton.next_power_of_2(2 * K),
                   BLOCK_K=triton.next_power_of_2(K), BLOCK_S=sb.ROW_TILE), num_warps=1)
    from mt.kernels import decode_attention as da
    for q, m in ((bf, bf), (f32, f32)):  # a decoding step's attention at the Multi30k model's sizes
        build(da._attention_step_kernel, dict(q_ptr=q, keys_ptr=q, mem_ptr=m, mask_ptr="*i1", ctx_ptr=m, w_ptr=f32),
              dict(BLOCK_Q=512, BLOCK_M=512, BLOCK_S=da.TILE // 512))
        for has_dw in (False, True):  # training's backward of it
            build(da._attention_step_backward_kernel,
                  dict(q_ptr=q, keys_ptr=q, mem_ptr=m, mask_ptr="*i1", w_ptr=f32, dctx_ptr=m, dw_ptr=f32, dq_ptr=q,
                       dk_ptr=q, dm_ptr=m),
                  dict(HAS_DW=has_dw, BLOCK_Q=512, BLOCK_M=512, BLOCK_S=da.BACKWARD_TILE // 512),
                  num_warps=da.BACKWARD_WARPS)
    from mt.kernels import search_greedy as sg
    build(sg._greedy_update_kernel, dict(best_ptr=f32, tok_ptr=i64, attn_ptr=bf, limit_ptr=i64, t_ptr=i64,
                                         done_ptr="*i1", scores_ptr=f32, last_ptr=i64, tok_hist_ptr=i64,
                                         attn_hist_ptr=f32), dict(BLOCK=sb.ROW_TILE), num_warps=1)
    for nt in (3, sb.MAX_STATE):  # the decoder state's gather after a beam step
        build(sb._gather_rows_kernel, dict(rows_ptr=i64, **{f"{x}{i}": (bf if i % 2 == 0 else f32)
                                                           for i in range(sb.MAX_STATE) for x in "sd"}),
              dict(NT=nt, BLOCK_H=512), num_warps=2)
    for K in (1, 5):  # beam search's output: the walk back (a while loop)
        build(sb._beam_backtrack_kernel, dict(info_ptr=i64, tok_hist_ptr=i64, bp_hist_ptr=i64, attn_hist_ptr=f32,
                                              tok_out_ptr=i64, attn_out_ptr=f32),
              dict(K=K, M=1, BLOCK_S=sb.ROW_TILE), num_warps=1)
    print("ok")
    """
)


def test_kernels_compile_for_h100():
    """Compile (no launch) every kernel for sm_90 with the real compiler, ptxas included: catches
    what the interpreter does not check (types, layouts, tl.dot shapes) on machines without a GPU."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build ships no ptxas")
    run_without_interpreter(_COMPILE_SCRIPT, timeout=300)
