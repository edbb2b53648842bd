"""The CPU emulation of TF32 matmuls rounds what a GPU would round, and only while the flag is on."""

from __future__ import annotations

import pytest
import torch

from cathode_ray.model.backbones.base import strict_float32
from cathode_ray.testing.tf32 import emulated_tf32, to_tf32


@pytest.mark.parametrize(("mode", "max_rel"), [("round", 2.0**-11), ("truncate", 2.0**-10)])
def test_to_tf32_keeps_ten_mantissa_bits(mode: str, max_rel: float) -> None:
    x = torch.randn(10_000) * 10.0 ** torch.randint(-3, 4, (10_000,))
    y = to_tf32(x, mode=mode)
    assert y.dtype == torch.float32
    assert int((y.view(torch.int32) & 0x1FFF).abs().max()) == 0  # low 13 mantissa bits cleared
    rel = ((y - x).abs() / x.abs()).max()
    assert 0 < float(rel) <= max_rel
    assert torch.equal(to_tf32(y, mode=mode), y)  # already on the grid
    if mode == "truncate":
        assert bool((y.abs() <= x.abs()).all())
    with pytest.raises(ValueError, match="round"):
        to_tf32(x, mode="nearest")


def test_emulation_follows_the_tf32_flag_and_strict_float32() -> None:
    a, w = torch.randn(64, 128), torch.randn(32, 128)
    exact = torch.nn.functional.linear(a, w)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with emulated_tf32():
            assert torch.equal(torch.nn.functional.linear(a, w), exact)  # flag off: exact
            torch.backends.cuda.matmul.allow_tf32 = True
            tf32 = torch.nn.functional.linear(a, w)
            with strict_float32(a):  # a readout: TF32 off inside, back on after
                assert torch.backends.cuda.matmul.allow_tf32 is False
                assert torch.equal(torch.nn.functional.linear(a, w), exact)
            assert torch.backends.cuda.matmul.allow_tf32 is True
            via_matmul = a @ w.T  # another matmul entry point, also rounded
            torch.testing.assert_close(via_matmul, tf32, rtol=1e-6, atol=1e-5)
            assert not torch.allclose(via_matmul, exact, rtol=1e-6, atol=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert 0 < float((tf32 - exact).abs().max()) < 1e-2 * float(exact.abs().max())
