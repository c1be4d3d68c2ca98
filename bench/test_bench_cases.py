"""The kernel cases of sparsekern.bench.cases through pytest-benchmark, for people who use it:

    pytest bench/ --benchmark-only

(Never part of the test suite: tests/ holds the tests, and no test is timed.)

pytest-benchmark times each case on its own, one after another: machine noise and drift
land on cases unevenly, and there is no noise floor. The numbers to compare are the
suite's (`python -m sparsekern bench --suite kernels`), which times the providers of a
case interleaved with dense twice; this file only checks each case, then times it for
people who keep pytest-benchmark histories."""
import pytest
import torch

from sparsekern.bench import cases

pytest.importorskip("pytest_benchmark")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _cases():
    for pattern, density in [("2:4", 0.5), ("unstructured", 0.3), ("unstructured", 0.1), ("block32", 0.1)]:
        for name in ["torch.dense"] + sorted(cases.providers(DEVICE, pattern)):
            for batch in (1, 8, 64):
                yield pytest.param(pattern, density, name, batch, id=f"{name}-{pattern}-{density}-b{batch}")


@pytest.mark.parametrize("pattern,density,provider,batch", list(_cases()))
def test_linear(benchmark, pattern, density, provider, batch):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    w = torch.randn(2048, 2048, device=DEVICE, dtype=DTYPE, generator=gen)
    if provider == "torch.dense":
        built = cases.Built(lambda x: torch.nn.functional.linear(x, w), w.numel() * w.element_size(), w)
    else:
        built = cases.providers(DEVICE, pattern)[provider](w, density, gen)
    x = torch.randn(batch, 2048, device=DEVICE, dtype=DTYPE, generator=gen)
    cases.check(built, x, f"{provider} {pattern}")
    benchmark.extra_info.update(pattern=pattern, density=density, batch=batch, weight_bytes=built.nbytes)
    benchmark(built.fn, x)
