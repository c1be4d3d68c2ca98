"""nm_conv2d: the C++ convolution (taps gathered into the 2:4 weight-stationary kernel's
tiles, or the patch matrix) and the reference, against fp64, with gradients and every bad
argument."""
import pytest
import torch
import torch.nn.functional as F

from backends import pairs, running
from conftest import assert_linear_close
from sparsekern import _extension, dispatch_rules, ops, reference
from sparsekern.formats import BitmaskWeight, NMWeight
from sparsekern.patterns import as_2d, nm24_panels_bytes

# (images, channels, H, W, out, kernel, stride, padding, dilation)
GEOMETRIES = [
    (1, 8, 4, 4, 4, (1, 1), 1, 0, 1),        # 16 pixels: the patch matrix
    (2, 16, 9, 7, 12, (3, 3), 1, 1, 1),      # 126 pixels: taps into the kernel's tiles
    (3, 12, 11, 10, 20, (3, 3), 2, 1, 2),    # stride and dilation; 12 channels: a partial 8 per tap
    (2, 8, 13, 9, 7, (5, 3), 1, (2, 1), 1),  # rectangular kernel and padding
    (1, 32, 10, 10, 16, (1, 1), 2, 0, 1),    # strided 1x1
    (2, 16, 64, 64, 24, (3, 3), 1, 1, 1),    # x tiles of 4.7 MB in 16 chunks: the chunk order (up to 16 threads)
    (20, 8, 1, 1, 4, (1, 1), 3, 1, 1),       # 1x1 input and output whose one tap lies in the padding
]
CHUNKED = GEOMETRIES[5]
ID = [f"{g[0]}x{g[1]}x{g[2]}x{g[3]}-o{g[4]}-k{g[5][0]}{g[5][1]}-s{g[6]}" for g in GEOMETRIES]


def _conv_case(geometry, n, m, dtype, with_bias, channels_last=False):
    images, c, h, w, o, k, stride, padding, dilation = geometry
    weight = torch.randn(o, c, *k, dtype=dtype)
    f = NMWeight.from_dense(as_2d(weight), n, m)
    x = torch.randn(images, c, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(o, dtype=dtype) if with_bias else None
    dense4 = f.to_dense().reshape(o, *k, c).permute(0, 3, 1, 2)  # the kept weight, [out, in, kh, kw]
    return f, x, bias, dense4, (stride, padding, dilation)


@pytest.mark.parametrize("device,backend", pairs("nm_conv2d"))
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=ID)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_nm_conv2d_matches_fp64(device, backend, geometry, n, m, dtype, with_bias, poison):
    if geometry[1] % m:
        pytest.skip(f"{geometry[1]} channels do not split into groups of {m}")
    f, x, bias, dense4, (s, p, d) = _conv_case(geometry, n, m, dtype, with_bias)
    with running(backend, "nm_conv2d", x, f):
        y = ops.nm_conv2d(x, f, geometry[5], bias, s, p, d)
    ref = F.conv2d(x.double(), dense4.double(), None if bias is None else bias.double(), s, p, d)
    lowp = F.conv2d(x, dense4, bias, s, p, d)
    assert_linear_close(y, ref, dtype, lowp, f"nm_conv2d {n}:{m} {backend} {dtype} {geometry}")


@pytest.mark.parametrize("order", ["panels", "chunks"])
@pytest.mark.parametrize("pre_packed", [True, False])
def test_both_orders_of_the_weight_stationary_kernel(order, pre_packed, monkeypatch, poison):
    monkeypatch.setenv("SPARSEKERN_WS_ORDER", order)
    monkeypatch.setattr(dispatch_rules, "CPU_GEMM_PANELS", pre_packed)
    f, x, bias, dense4, (s, p, d) = _conv_case(CHUNKED, 2, 4, torch.float32, True, channels_last=True)
    with running("cpp", "nm_conv2d", x, f):
        y = ops.nm_conv2d(x, f, 3, bias, s, p, d)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_linear_close(y, F.conv2d(x.double(), dense4.double(), bias.double(), s, p, d), torch.float32,
                        what=f"nm_conv2d in {order}, pre-packed {pre_packed}")
    reads = bool(_extension.BUILD_INFO.get("cpu_avx2_runtime"))  # the AVX2 and AVX-512 kernels read them
    assert f.derived_nbytes == (nm24_panels_bytes(*f.shape) if pre_packed and reads else 0)
    assert ("gemm_panels" in ops.explain_backend("nm_conv2d", x, f, 3, bias, s, p, d)[1]) == (pre_packed and reads)
    if pre_packed and reads:  # the kernel read them: zeroed bytes leave only the bias
        zeros = torch.zeros(nm24_panels_bytes(*f.shape), dtype=torch.uint8)
        y0 = torch.ops.sparsekern.nm_conv2d_cpu(x, f.values, f.indices, 2, 4, [24, 16, 3, 3], [s, s], [p, p],
                                                [d, d], bias, dispatch_rules.NM_ALGO_GEMM, zeros)
        torch.testing.assert_close(y0, bias.view(1, -1, 1, 1).expand_as(y0), rtol=0, atol=0)


@pytest.mark.skipif(not _extension.BUILD_INFO.get("cpu_avx2_runtime"),
                    reason="the 2:4 GEMM kernel runs on AVX2/AVX-512 CPUs only")
def test_bad_panels_are_refused():
    """panels reach only the CPU-only op nm_conv2d_cpu, with the algorithm chosen in Python."""
    f, x, bias, _, (s, p, d) = _conv_case(GEOMETRIES[1], 2, 4, torch.float32, True)
    args = (x, f.values, f.indices, 2, 4, [12, 16, 3, 3], [s, s], [p, p], [d, d], bias)
    run = torch.ops.sparsekern.nm_conv2d_cpu
    gemm = dispatch_rules.NM_ALGO_GEMM
    good = reference.nm24_pack_panels(f.values, f.indices, f.in_features)
    for panels, match in ((good[:-72], "panels must be 1-D with"), (good.view(torch.int8), "panels"),
                          (good.view(8, -1), "panels must be 1-D with")):
        with pytest.raises((TypeError, ValueError), match=match):
            run(*args, gemm, panels)
    with pytest.raises(ValueError, match="panels are read by algo 1"):
        run(*args, dispatch_rules.NM_ALGO_DECODE, good)
    want = torch.ops.sparsekern.nm_conv2d(*args)
    torch.testing.assert_close(run(*args, gemm, good), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(*args, gemm, None), want, rtol=1e-5, atol=1e-5)


def test_gradients_match_the_reference():
    f, x, bias, _, (s, p, d) = _conv_case(GEOMETRIES[2], 2, 4, torch.float32, True)
    fr = NMWeight.from_dense(f.to_dense(), 2, 4)  # a separate copy for the reference's graph
    grads = []
    for backend, fmt in (("cpp", f), ("reference", fr)):
        xg = x.clone().requires_grad_()
        bg = bias.clone().requires_grad_()
        fmt.values.requires_grad_()
        with running(backend, "nm_conv2d", xg, fmt):
            ops.nm_conv2d(xg, fmt, 3, bg, s, p, d).square().sum().backward()
        grads.append((xg.grad, fmt.values.grad, bg.grad))
    for name, got, want in zip(("x", "values", "bias"), *grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"gradient of {name}")


def test_nan_reaches_only_the_pixels_whose_taps_read_it():
    f, x, _, _, _ = _conv_case((1, 8, 6, 6, 4, (3, 3), 1, 1, 1), 2, 4, torch.float32, False)
    x = x.repeat(4, 1, 1, 1)  # 144 output pixels: the weight-stationary kernel
    x[2, :, 0, 0] = float("nan")
    y = ops.nm_conv2d(x, f, 3, None, 1, 1, 1)
    assert torch.isfinite(y[[0, 1, 3]]).all() and torch.isfinite(y[2, :, 3:, 3:]).all()
    assert torch.isnan(y[2, :, :2, :2]).any()


def _bad(**change):
    f, x, bias, _, _ = _conv_case(GEOMETRIES[1], 2, 4, torch.float32, True)
    args = dict(x=x, weight=f, kernel_size=3, bias=bias, stride=1, padding=1, dilation=1)
    args.update(change)
    return args


@pytest.mark.parametrize("change,error,words", [
    (dict(x=torch.randn(16, 9, 7)), ValueError, "x must be a 4-D"),
    (dict(x=torch.randn(2, 12, 9, 7)), ValueError, "channels"),
    (dict(x=torch.randn(2, 16, 9, 7, dtype=torch.float64)), TypeError, "dtype"),
    (dict(x=torch.randn(2, 16, 9, 7).int()), TypeError, "floating"),
    (dict(kernel_size=5), ValueError, "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size"),
    (dict(stride=0), ValueError, "stride"),
    (dict(stride=1.5), TypeError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(padding=2**40), ValueError, "padding"),
    (dict(x=torch.randn(2, 6, 5, 5), weight=NMWeight.from_dense(torch.randn(12, 24), 2, 4), kernel_size=2),
     ValueError, "multiple of m"),
    (dict(dilation=(1, 0)), ValueError, "dilation"),
    (dict(x=torch.randn(2, 16, 2, 2), padding=0), ValueError, "smaller than the dilated kernel"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(weight=BitmaskWeight.from_dense(torch.randn(12, 144))), TypeError, "NMWeight"),
])
def test_bad_arguments_are_refused(change, error, words):
    with pytest.raises(error, match=words):
        ops.nm_conv2d(**_bad(**change))


@pytest.mark.parametrize("change,words", [
    (dict(values=lambda f: f.values[:, :-2]), "values must have shape"),
    (dict(indices=lambda f: f.indices[:, :-1]), "indices must have shape"),
    (dict(indices=lambda f: f.indices.to(torch.int32)), "indices must be"),
    (dict(shape=[12, 16, 3]), "weight_shape"),
    (dict(shape=[12, 15, 3, 3]), "channels"),
    (dict(stride=[0, 1]), "stride"),
    (dict(padding=[1]), "padding"),
    (dict(dilation=[1, -1]), "dilation"),
    (dict(m=6), "m must be"),
])
def test_raw_op_checks_its_arguments(change, words):
    f, x, bias, _, _ = _conv_case(GEOMETRIES[1], 2, 4, torch.float32, True)
    values = change.get("values", lambda f: f.values)(f)
    indices = change.get("indices", lambda f: f.indices)(f)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=words):
        torch.ops.sparsekern.nm_conv2d(x, values, indices, 2, change.get("m", 4), change.get("shape", [12, 16, 3, 3]),
                                       change.get("stride", [1, 1]), change.get("padding", [1, 1]),
                                       change.get("dilation", [1, 1]), bias)
