"""A small run of every CUDA nested CSR op for compute-sanitizer (bench/gpu_check.sh): forward (both kernels, with
and without plan, every dtype), backward, convolution, a corrupted index (which must raise, not fault), deferred
checks and a CUDA graph. Prints 'sanitize run: ok' at the end."""

import torch

import nestsparse as ns


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
