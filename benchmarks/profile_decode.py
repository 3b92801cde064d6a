"""Where the time of a graphed decoding batch goes, on a GPU: the encoder, the captured search
steps (and the kernels inside one), the host's read-back of the results.

    python benchmarks/profile_decode.py --json profile_decode.json      # GPU
    python benchmarks/profile_decode.py --quick                         # CPU smoke test (emulated steps)

The model and batch are benchmarks/bench_train.py's (Multi30k sizes, bf16, 128 sentences, an
untrained model, so most outputs run to the length limit). For each cell (ours, cuDNN) and
search (greedy, beam 5): the wall time of a whole search (median), of the encoder (its graph
replayed, and run eagerly as the plain search does), of one
captured search step (its graph replayed for a whole search, synchronized at the end), and of `output()` (the
back-pointers and attention read back to the host); then a torch.profiler table of the kernels
one replayed step launches (count and device time per step), whose sum against the step's time
shows what the gaps between kernels cost. Needs only torch, triton and numpy.

Cells: ours (our Triton gate cell and the search's fused kernels), cudnn, and variants of
ours that turn search kernels off, to measure what each gives:

    python benchmarks/profile_decode.py --cells ours ours-row-topk ours-topk-only ours-host-output \
        ours-torch-attention ours-torch-search cudnn

ours-topk-only keeps the fused log-softmax + top-k (mt/kernels/search_topk.py) but does the
search's bookkeeping with PyTorch ops (`mt.kernels.reference`'s `beam_update` and `greedy_update`, not
mt/kernels/search_beam.py and search_greedy.py);
ours-torch-attention runs the decoder step's attention as PyTorch's six ops (not
mt/kernels/decode_attention.py); ours-host-output rebuilds beam search's hypotheses on the
host (`reference.backtrack`, numpy, after copying the whole history back) instead of
`search_beam.backtrack` on the device; ours-torch-search uses PyTorch's ops and the host rebuild for all of the search (what the
cuDNN cell's search runs; its decoder step keeps the attention kernel, so this is not what a
cuDNN step runs); ours-row-topk has the top-k take rows up to 8192 wide whole, one program each
(the kernel before the chunked one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train as bt  # noqa: E402

BOS, EOS = bt.BOS, bt.EOS


def timed(fn, device: str, reps: int) -> float:
    """Median wall seconds of fn() (synchronized on both ends)."""
    out = []
    for _ in range(reps):
        bt.sync(device)
        t0 = time.perf_counter()
        fn()
        bt.sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def kernel_table(fn, steps: int, top: int) -> dict:
    """torch.profiler over fn() (which runs `steps` search steps): device kernels per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    agg: dict[str, list[float]] = {}
    for e in prof.events():  # device-side events: the kernels (and memcpy/memset) themselves
        if e.device_type == DeviceType.CUDA:
            us = getattr(e, "device_time", None)
            if us is None:
                us = e.cuda_time
            a = agg.setdefault(e.name, [0, 0.0])
            a[0] += 1
            a[1] += us
    rows = [dict(kernel=k[:110], per_step=c / steps, us_per_step=us / steps) for k, (c, us) in agg.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    return dict(
        kernels_per_step=sum(r["per_step"] for r in rows),
        kernel_us_per_step=sum(r["us_per_step"] for r in rows),
        top=rows[:top],
    )


_OFF = lambda *a: False  # noqa: E731
VARIANTS = {  # our cell with search kernels off: (module, attribute, what it is set to), ...
    "ours-row-topk": (("mt.kernels.search_topk", "ROW_V", 8192),),  # rows up to 8192 wide: one program each
    "ours-topk-only": (("mt.kernels.search_beam", "supported", _OFF), ("mt.kernels.search_greedy", "supported", _OFF)),
    "ours-host-output": (("mt.search", "_backtrack_kernel_takes", _OFF),),
    "ours-torch-attention": (("mt.kernels.decode_attention", "supported", _OFF),),
    "ours-torch-search": (("mt.search", "fused", _OFF), ("mt.search", "_backtrack_kernel_takes", _OFF)),
}


@contextlib.contextmanager
def patched(variants: dict, variant: str | None):
    """For the with-block, set each (module, attribute) of variants[variant] (None: nothing).
    The attribute may be dotted ("Class.method"): set on what the path before its last name is."""
    patches = []
    for name, path, value in variants.get(variant, ()):
        *outer, attr = path.split(".")
        owner = importlib.import_module(name)
        for a in outer:
            owner = getattr(owner, a)
        patches.append((owner, attr, value))
    real = [getattr(module, attr) for module, attr, _ in patches]
    for module, attr, value in patches:
        setattr(module, attr, value)
    try:
        yield
    finally:
        for (module, attr, _), value in zip(patches, real):
            setattr(module, attr, value)


def profile_one(args, cell: str, beam: int, batch, variant: str | None = None) -> dict:
    """variant: None, or a key of VARIANTS."""
    with patched(VARIANTS, variant):
        return _profile_one(args, cell, beam, batch)


def _profile_one(args, cell: str, beam: int, batch) -> dict:
    from mt import graphs, runtime
    from mt.search import search

    device = args.device
    model = bt.build_model(args, cell).eval()
    runner = graphs.GraphedDecoder(model, emulate=device != "cuda")
    src, src_len = batch.src.to(device), batch.src_len.to(device)
    amp = args.amp_dtype
    lp = 1.0 if beam > 1 else None

    def autocast():
        return runtime.autocast(device, amp)

    def run():
        with autocast():
            return search(
                model,
                src,
                src_len,
                BOS,
                EOS,
                beam=beam,
                length_penalty=lp,
                max_len_a=args.max_len_a,
                max_len_b=args.max_len_b,
                graphs=runner,
            )

    run(), run()  # compile, warm up, capture
    res: dict = dict(cell=cell, beam=beam)
    res["search_ms"] = timed(run, device, args.reps) * 1e3
    slot = next(s for s in runner._slots.values() if s.search is not None)
    with torch.no_grad():

        def encode_eager():  # what the search did before the encoder was captured too
            with autocast():
                memory, dec = model.encode(src, src_len)
                if beam > 1:
                    rows = torch.arange(src.shape[0], device=device).repeat_interleave(beam)
                    memory.index_select(rows), dec.index_select(rows)

        res["encode_eager_ms"] = timed(encode_eager, device, args.reps) * 1e3
        if slot.encoder.graph is not None:  # the captured encoder (mt.graphs.GraphedDecoder.slot)
            res["encode_ms"] = timed(slot.encoder.graph.replay, device, args.reps) * 1e3
        else:
            res["encode_ms"] = res["encode_eager_ms"]
    steps = int(max(bt_limits(src_len, args)))
    res["steps"] = steps
    search_obj = slot.search
    n = src.shape[0]
    lens = src_len.tolist()
    if beam > 1:
        res["output_ms"] = timed(lambda: search_obj.output(steps, n, lens), device, args.reps) * 1e3
    else:
        lim = bt_limits(src_len, args)
        res["output_ms"] = timed(lambda: search_obj.output(steps, n, lens, lim), device, args.reps) * 1e3

    def one_step():  # what mt.search._run does per position: replay the captured step (CPU: emulate it)
        runner.replay(
            slot, lambda: search_obj.state.copy_(search_obj.step(model.decoder.step_logits, search_obj.state))
        )

    def chunk(synced: bool = False):  # a whole search's steps from a fresh start (the history has T rows;
        # the decoder state is the last search's end, which costs the same fixed-shape step)
        search_obj.reset(n)
        bt.sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
            if synced:
                bt.sync(device)
        bt.sync(device)
        return time.perf_counter() - t0

    with torch.no_grad(), autocast():
        chunk()
        res["step_us"] = statistics.median(chunk() for _ in range(args.reps)) / steps * 1e6
        # a host that waits on every step (what a per-step done check would cost)
        res["step_us_synced"] = statistics.median(chunk(True) for _ in range(args.reps)) / steps * 1e6
        if device == "cuda":
            search_obj.reset(n)
            try:
                res["profile"] = kernel_table(lambda: [one_step() for _ in range(steps)], steps, args.top)
            except Exception as e:  # the profiler is a nice-to-have
                res["profile"] = dict(error=f"{type(e).__name__}: {e}"[:300])
    res["steps_ms"] = res.get("step_us", 0) * steps / 1e3
    return res


def bt_limits(src_len, args) -> list[int]:
    from mt.search import max_lengths

    return max_lengths(src_len.cpu(), args.max_len_a, args.max_len_b).tolist()


def micro(args) -> dict:
    """The beam step's largest pieces alone (CUDA events, median over replays)."""
    if args.device != "cuda":
        return {}
    n, K, V = args.decode_batch, args.beam, args.vocab
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(n * K, V, device="cuda", generator=g).to(torch.bfloat16)
    cand = torch.randn(n, K * V, device="cuda", generator=g)
    small = torch.randn(n, 2 * K * 2 * K // 2, device="cuda", generator=g)
    tests = {
        "log_softmax(bf16 -> fp32) (n*K, V)": lambda: torch.log_softmax(logits.float(), dim=-1),
        "topk(2K) over (n, K*V)": lambda: cand.topk(2 * K, dim=-1),
        "topk(2K) per row (n*K, V)": lambda: cand.view(n * K, V).topk(2 * K, dim=-1),
        "sort stable (n, 2K)": lambda: small[:, : 2 * K].sort(dim=1, descending=True, stable=True),
        "add (n, K, V) fp32": lambda: cand.view(n, K, V) + cand.view(n, K, V)[:, :1],
    }
    out = {}
    for name, fn in tests.items():
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            fn()
        end.record()
        torch.cuda.synchronize()
        out[name] = start.elapsed_time(end) * 10  # us per call (launches included)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny sizes")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--cells", nargs="+", default=["ours", "cudnn"], choices=["ours", "cudnn", *VARIANTS])
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    args = bt.parse_args(["--quick"] if a.quick else [])
    args.reps, args.top = (1 if a.quick else a.reps), a.top
    ours = "triton" if args.device == "cuda" else "torch"
    batch = bt.random_batches(args, 1, args.decode_batch, seed=2000 + args.seed)[0]
    env = bt.environment(args, ours)
    print(f"# profile_decode on {env.get('gpu') or env.get('cpu')}  torch {env['torch']}  triton {env['triton']}")
    results = []
    for cell in a.cells:
        for beam in (1, args.beam):
            try:
                r = profile_one(
                    args, "cudnn" if cell == "cudnn" else ours, beam, batch, variant=cell if cell in VARIANTS else None
                )
            except Exception as e:
                import traceback

                traceback.print_exc()
                r = dict(cell=cell, beam=beam, error=f"{type(e).__name__}: {e}"[:400])
            r["name"] = cell
            results.append(r)
            prof = r.get("profile", {})
            print(
                f"{cell:6} beam {beam}: search {r.get('search_ms', 0):7.2f} ms = encode {r.get('encode_ms', 0):6.2f} "
                f"(eager {r.get('encode_eager_ms', 0):6.2f}) "
                f"+ {r.get('steps', 0)} steps x {r.get('step_us', 0):6.1f} us ({r.get('steps_ms', 0):6.2f} ms; "
                f"synced {r.get('step_us_synced', 0):6.1f} us) + output {r.get('output_ms', 0):6.2f} ms | "
                f"kernels/step {prof.get('kernels_per_step', 0):5.1f} summing {prof.get('kernel_us_per_step', 0):6.1f} us"
            )
            for k in prof.get("top", [])[:25]:
                print(f"      {k['per_step']:5.1f} x {k['us_per_step']:7.1f} us  {k['kernel']}")
            if "error" in r or "error" in prof:
                print("   !", r.get("error") or prof.get("error"))
    m = micro(args)
    for k, v in m.items():
        print(f"micro {v:8.1f} us  {k}")
    if a.json:
        a.json.write_text(json.dumps(dict(environment=env, results=results, micro=m), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
