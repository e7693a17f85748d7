"""The Haar path is pytorch_wavelets' one-level DWT, and hf() keeps only what the high bands carry."""
import torch
from pytorch_wavelets import DWTForward, DWTInverse

from distill.ds2d2.haar import haar_split, high_frequency


def test_haar_split_equals_pytorch_wavelets_and_reconstructs():
    x = torch.randn(2, 5, 16, 12)
    low, high = haar_split(x)
    ref_low, (ref_high,) = DWTForward(J=1, wave="haar", mode="zero")(x)
    assert low.shape == (2, 5, 8, 6) and high.shape == (2, 5, 3, 8, 6)
    torch.testing.assert_close(low, ref_low, rtol=0, atol=0)
    torch.testing.assert_close(high, ref_high, rtol=0, atol=0)
    torch.testing.assert_close(DWTInverse(wave="haar", mode="zero")((low, [high])), x, rtol=1e-5, atol=1e-5)


def test_odd_sizes_round_up_like_the_reference():
    low, high = haar_split(torch.randn(1, 3, 5, 1))
    assert low.shape == (1, 3, 3, 1) and high.shape == (1, 3, 3, 3, 1)


def test_high_frequency_is_upsampled_sum_of_high_bands():
    x = torch.randn(1, 4, 10, 14)
    _, (ref_high,) = DWTForward(J=1, wave="haar", mode="zero")(x)
    expected = torch.nn.functional.interpolate(ref_high.sum(2), size=(10, 14), mode="bilinear", align_corners=False)
    torch.testing.assert_close(high_frequency(x), expected)


def test_high_frequency_of_smooth_map_is_zero_and_of_checkerboard_is_not():
    flat = torch.full((1, 2, 8, 8), 3.0)
    assert high_frequency(flat).abs().max() < 1e-6
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]).remainder(2).float().expand(1, 2, 8, 8)
    assert high_frequency(checker).abs().mean() > 0.1


def test_gradient_flows_through_haar():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    high_frequency(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradient_flows_under_autocast():
    # AMP runs the forward in low precision; pytorch_wavelets' own backward must still see matching dtypes.
    for dtype in (torch.float32, torch.bfloat16):  # a map cast up for the loss, and an FPN map as autocast leaves it
        x = torch.randn(1, 2, 8, 8, dtype=dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = high_frequency(x).float().square().sum()
        loss.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
