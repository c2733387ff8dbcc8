"""A small run of every CUDA op of both formats for compute-sanitizer (bench/gpu_check.sh): forward (every kernel,
with and without plan, every dtype), backward, convolution (grouped too), a corrupted index (which must raise, not
fault), deferred checks and a CUDA graph. Prints 'sanitize run: ok' at the end."""

import torch

import nestsparse as ns


def nbcr(g: torch.Generator) -> None:
    """Nested BCR: the tile kernel at one and several tiles of p, blocks of 8 and 48 (both tile heights), every
    dtype, both backward passes, a grouped convolution, and a corrupted local row."""
    w = torch.randn(100, 70, generator=g)
    for bs in ((8, 8), (48, 16)):
        tags = ns.bcr_tags(w, (0.5, 0.2), bs)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            nw = ns.NestedBCR.from_dense(w.to(dtype), tags, bs, densities=(0.5, 0.2)).to("cuda")
            for n in (3, 136):
                x = torch.randn(n, 70, device="cuda", dtype=dtype, requires_grad=True)
                v = nw.values.clone().requires_grad_()
                for level, plan in ((0, None), (1, nw.plan())):
                    y = ns.ops.nbcr_linear(x, v, *nw.index_tensors(), level, 100, bs, None, "gelu", plan)
                    y.float().sum().backward()
    cw = torch.randn(8, 2, 3, 3, generator=g)
    cnw = ns.NestedBCR.from_dense(cw, ns.bcr_tags(cw, (0.5, 0.2), (4, 6)), (4, 6), densities=(0.5, 0.2)).to("cuda")
    x = torch.randn(2, 4, 9, 7, device="cuda", requires_grad=True)
    v = cnw.values.clone().requires_grad_()
    y = ns.ops.nbcr_conv2d(x, v, *cnw.index_tensors(), 1, 8, (4, 6), (3, 3), None, 2, 1, 1, 2, "relu")
    y.sum().backward()
    bad = ns.NestedBCR.from_dense(w, ns.bcr_tags(w, (0.5, 0.2), (8, 8)), (8, 8), densities=(0.5, 0.2))
    bad.indices[0] = 1000
    try:
        bad.to("cuda").linear(torch.randn(2, 70, device="cuda"), 0)
        raise SystemExit("a corrupted local row did not raise")
    except RuntimeError as e:
        assert "block" in str(e), e


def main() -> None:
    if not torch.cuda.is_available() or not torch.ops.nestsparse.with_cuda():
        raise SystemExit("bench/gpu_sanitize.py needs a GPU and a CUDA build of nestsparse")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 53, generator=g)
    tags = ns.magnitude_tags(w, (0.4, 0.1))
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        nw = ns.NestedCSR.from_dense(w.to(dtype), tags, densities=(0.4, 0.1)).to("cuda")
        for n in (1, 3, 40):
            x = torch.randn(n, 53, device="cuda", dtype=dtype, requires_grad=True)
            v = nw.values.clone().requires_grad_()
            for level, plan in ((0, None), (1, nw.plan())):
                y = ns.ops.ncsr_linear(x, v, nw.col_idx, nw.row_ptr, nw.row_end, level, None, "gelu", plan)
                y.float().sum().backward()
    cw = torch.randn(8, 3, 3, 3, generator=g)
    cnw = ns.NestedCSR.from_dense(cw, ns.magnitude_tags(cw, (0.5, 0.2)), densities=(0.5, 0.2)).to("cuda")
    x = torch.randn(2, 3, 9, 7, device="cuda", requires_grad=True)
    v = cnw.values.clone().requires_grad_()
    y = ns.ops.ncsr_conv2d(x, v, cnw.col_idx, cnw.row_ptr, cnw.row_end, 1, (3, 3), None, 2, 1, 1, 1, "relu")
    y.sum().backward()
    nbcr(g)
    bad = ns.NestedCSR.from_dense(w, tags, densities=(0.4, 0.1))
    bad.col_idx[3] = 1000
    bad = bad.to("cuda")
    try:
        bad.linear(torch.randn(2, 53, device="cuda"), 0)
        raise SystemExit("a corrupted column index did not raise")
    except RuntimeError as e:
        assert "col_idx" in str(e), e
    with ns.deferred_checks():
        nw32 = ns.NestedCSR.from_dense(w, tags, densities=(0.4, 0.1)).to("cuda")
        x = torch.randn(4, 53, device="cuda")
        graph = torch.cuda.CUDAGraph()
        nw32.linear(x, 0, None, "none", nw32.plan())
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            y = nw32.linear(x, 1)
        graph.replay()
    torch.cuda.synchronize()
    print("sanitize run: ok")


if __name__ == "__main__":
    main()
