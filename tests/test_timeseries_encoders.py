"""Time-series encoders: shapes and masks, padding invariance, lead identity, z-norm statistics, long input."""

from __future__ import annotations

import math

import pytest
import torch

from encoders.timeseries import PatchTransformerEncoder, ResNet1dEncoder
from mmclin.errors import ConfigError


def tiny_patch(n_channels: int = 3, **kwargs) -> PatchTransformerEncoder:
    config = dict(patch_size=25, d_model=16, n_layers=1, n_heads=2) | kwargs
    return PatchTransformerEncoder(n_channels, **config)


def tiny_resnet(n_channels: int = 3, **kwargs) -> ResNet1dEncoder:
    config = dict(widths=(8, 16, 16), blocks_per_stage=(1, 1, 1)) | kwargs
    return ResNet1dEncoder(n_channels, **config)


def garbage_padded(series: torch.Tensor, extra: int) -> torch.Tensor:
    """(B, C, L) -> (B, C, L + extra), the new samples huge and one of them NaN."""
    pad = torch.randn(*series.shape[:2], extra) * 1e3
    pad[..., -1] = float("nan")
    return torch.cat([series, pad], -1)


@pytest.mark.parametrize("stride", [None, 10])
def test_patch_shapes_and_mask_rule(stride):
    torch.manual_seed(0)
    enc = tiny_patch(stride=stride)
    lengths = torch.tensor([300, 180, 26, 7])
    out = enc(torch.randn(4, 3, 300), lengths)
    step = stride or 25
    # Documented rule: the fewest patches that cover all valid samples, per channel.
    expected = [math.ceil(max(n - 25, 0) / step) + 1 for n in lengths.tolist()]
    n_patches = max(expected)
    assert out.tokens.shape == (4, 3 * n_patches, enc.out_dim)
    assert out.pooled.shape == (4, enc.out_dim) and out.mean.shape == out.std.shape == (4, 3)
    assert out.mask.dtype == torch.bool and out.mask.sum(1).tolist() == [3 * n for n in expected]
    # Channel-major layout: the mask and channel_index repeat per lead.
    assert out.channel_index.tolist() == [c for c in range(3) for _ in range(n_patches)]
    assert torch.equal(out.mask.view(4, 3, n_patches)[:, 0, :].sum(1), torch.tensor(expected))
    assert torch.all(out.tokens[~out.mask] == 0)


def test_resnet_shapes_and_mask_rule():
    torch.manual_seed(0)
    enc = tiny_resnet(d_model=24)
    assert enc.total_stride == 2 * 2**2 and enc.out_dim == 24
    lengths = torch.tensor([1000, 333, 1])
    out = enc(torch.randn(3, 3, 1000), lengths)
    assert out.tokens.shape == (3, math.ceil(1000 / 8), 24) and out.pooled.shape == (3, 24)
    assert out.mask.sum(1).tolist() == [math.ceil(n / 8) for n in lengths.tolist()]
    assert out.mean is None and out.std is None and torch.all(out.channel_index == -1)


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
def test_patch_padding_does_not_change_valid_outputs(positions):
    torch.manual_seed(0)
    enc = tiny_patch(stride=10, positions=positions).eval()
    short, long = torch.randn(1, 3, 170), torch.randn(1, 3, 300)
    batch = torch.cat([garbage_padded(short, 130), long])
    with torch.no_grad():  # eval + no_grad also exercises nn.TransformerEncoder's fast path
        alone, batched = enc(short), enc(batch, torch.tensor([170, 300]))
    n = alone.tokens.shape[1] // 3
    valid_part = batched.tokens[0].view(3, -1, enc.out_dim)[:, :n].reshape(-1, enc.out_dim)
    torch.testing.assert_close(valid_part, alone.tokens[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.mean[0], alone.mean[0])
    torch.testing.assert_close(batched.std[0], alone.std[0])


def test_resnet_padding_does_not_change_valid_outputs():
    torch.manual_seed(0)
    enc = tiny_resnet()
    enc.train()(torch.randn(4, 3, 500))  # move BatchNorm running stats away from their identity init
    enc.eval()
    short, long = torch.randn(1, 3, 333), torch.randn(1, 3, 1000)
    with torch.no_grad():
        alone = enc(short)
        batched = enc(torch.cat([garbage_padded(short, 667), long]), torch.tensor([333, 1000]))
    n = alone.tokens.shape[1]
    torch.testing.assert_close(batched.tokens[0, :n], alone.tokens[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-4)


def test_swapping_leads_changes_pooled_output():
    torch.manual_seed(0)
    enc = tiny_patch(n_channels=2).eval()
    series = torch.randn(1, 2, 200)
    with torch.no_grad():
        pooled, swapped = enc(series).pooled, enc(series.flip(1)).pooled
    # Without the lead embedding the token set would only be permuted and the mean pool unchanged.
    assert (pooled - swapped).abs().max() > 1e-2


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
def test_positions_make_patch_order_matter(positions):
    torch.manual_seed(0)
    enc = tiny_patch(n_channels=1, positions=positions).eval()
    series = torch.randn(1, 1, 4 * 25)
    patches_reversed = series.view(1, 1, 4, 25).flip(2).reshape(1, 1, 100)
    with torch.no_grad():
        out, out_reversed = enc(series), enc(patches_reversed)
    assert torch.isfinite(out.tokens).all()
    # Same patches, other order: only position information can tell them apart after mean pooling.
    assert (out.pooled - out_reversed.pooled).abs().max() > 1e-3


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
def test_positions_follow_time_not_lead(positions):
    torch.manual_seed(0)
    enc = tiny_patch(n_channels=2, positions=positions).eval()
    with torch.no_grad():
        enc.channel_embed.weight.zero_()
        out = enc(torch.randn(1, 1, 200).repeat(1, 2, 1))
    # Identical leads without a lead embedding: patch t of lead 0 and of lead 1 share a position, so they match.
    per_lead = out.tokens[0].view(2, -1, enc.out_dim)
    torch.testing.assert_close(per_lead[0], per_lead[1], atol=1e-5, rtol=1e-4)


def test_rotary_and_sinusoidal_differ():
    series = torch.randn(2, 3, 200)
    outputs = {}
    for positions in ("sinusoidal", "rotary"):
        torch.manual_seed(0)
        outputs[positions] = tiny_patch(positions=positions).eval()(series).pooled
    assert all(torch.isfinite(p).all() for p in outputs.values())
    assert not torch.allclose(outputs["sinusoidal"], outputs["rotary"], atol=1e-3)


def test_znorm_statistics_match_valid_samples_and_flat_lead_is_finite():
    torch.manual_seed(0)
    enc = tiny_patch(n_channels=2)
    series = torch.randn(2, 2, 400) * torch.tensor([[[2.0], [0.5]]]) + torch.tensor([[[5.0], [-1.0]]])
    series[1, 1, :] = 3.0  # a flat lead (disconnected electrode)
    lengths = torch.tensor([400, 251])
    out = enc(garbage_padded(series, 50), lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out.mean[i], series[i, :, :n].mean(-1))
        torch.testing.assert_close(out.std[i], series[i, :, :n].std(-1, correction=0), atol=1e-5, rtol=1e-4)
    assert out.std[1, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
def test_long_input_has_no_length_dependent_parameters(positions):
    torch.manual_seed(0)
    enc = PatchTransformerEncoder(2, patch_size=256, d_model=32, n_layers=1, n_heads=2, positions=positions)
    n_params = sum(p.numel() for p in enc.parameters())
    with torch.no_grad():
        short = enc(torch.randn(1, 2, 1000))
        long = enc(torch.randn(1, 2, 65536))
    assert short.tokens.shape == (1, 2 * 4, 32) and long.tokens.shape == (1, 2 * 256, 32)
    assert torch.isfinite(long.pooled).all()
    assert sum(p.numel() for p in enc.parameters()) == n_params
    assert not any(b.numel() for b in enc.buffers())


def test_patch_transformer_learns_sine_frequency():
    torch.manual_seed(0)
    fs, n = 50, 64
    t = torch.arange(2 * fs) / fs
    labels = torch.arange(n) % 2
    freq = torch.where(labels == 0, 1.0, 5.0)[:, None]
    phase = torch.rand(n, 1) * 2 * math.pi
    series = (torch.sin(2 * math.pi * freq * t + phase) + 0.1 * torch.randn(n, t.numel())).unsqueeze(1)
    enc = PatchTransformerEncoder(1, patch_size=10, d_model=16, n_layers=1, n_heads=2)
    head = torch.nn.Linear(enc.out_dim, 2)
    optimizer = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(head(enc(series).pooled), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (head(enc(series).pooled).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9


def test_bad_arguments_and_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"d_model \(30\) should be divisible by n_heads \(4\)"):
        PatchTransformerEncoder(3, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="stride"):
        PatchTransformerEncoder(3, patch_size=10, stride=20)
    with pytest.raises(ValueError, match="odd"):
        ResNet1dEncoder(3, kernel_size=4)
    with pytest.raises(ValueError, match="series has 2 channels but the encoder was built for 3"):
        tiny_patch()(torch.randn(1, 2, 100))
    with pytest.raises(ValueError, match="series has 12 channels but the encoder was built for 3"):
        tiny_resnet()(torch.randn(1, 12, 100))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 100\]"):
        tiny_patch()(torch.randn(2, 3, 100), torch.tensor([100, 101]))


def test_max_channels_accepts_lead_subsets():
    torch.manual_seed(0)
    enc = tiny_patch(n_channels=12, max_channels=12)
    assert enc(torch.randn(1, 1, 100)).channel_index.unique().tolist() == [0]
    with pytest.raises(ValueError, match="at most 12"):
        enc(torch.randn(1, 13, 100))


def test_a_window_covering_the_series_changes_nothing():
    torch.manual_seed(0)
    full = PatchTransformerEncoder(12, patch_size=50, d_model=32, n_layers=2, n_heads=4).eval()
    windowed = PatchTransformerEncoder(12, patch_size=50, d_model=32, n_layers=2, n_heads=4, window=20).eval()
    windowed.load_state_dict(full.state_dict())
    x, lengths = torch.randn(2, 12, 1000), torch.tensor([1000, 730])
    with torch.no_grad():
        a, b = full(x, lengths), windowed(x, lengths)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)


def test_windowed_attention_keeps_shapes_masks_and_stays_inside_its_block():
    torch.manual_seed(0)
    kwargs = {"patch_size": 10, "d_model": 32, "n_layers": 1, "n_heads": 4, "normalize": False}
    full = PatchTransformerEncoder(3, **kwargs).eval()
    windowed = PatchTransformerEncoder(3, window=8, **kwargs).eval()
    windowed.load_state_dict(full.state_dict())
    x, lengths = torch.randn(2, 3, 300), torch.tensor([300, 95])  # 30 patches; the second item has 10
    with torch.no_grad():
        out = windowed(x, lengths)
        reference = full(x, lengths)
        first_block = full(x[:1, :, :80])  # the first 8 patches of every lead, alone
    assert out.tokens.shape == reference.tokens.shape == (2, 90, 32) and torch.equal(out.mask, reference.mask)
    assert torch.isfinite(out.tokens).all() and not out.tokens[~out.mask].any()
    # one layer, no shift: tokens of the first block see only that block (all leads of its 8 patches)
    ours = out.tokens[:1].reshape(1, 3, 30, 32)[:, :, :8]
    assert torch.allclose(ours, first_block.tokens.reshape(1, 3, 8, 32), atol=1e-5)
    assert not torch.allclose(out.tokens[:1], reference.tokens[:1], atol=1e-3)  # unlike global attention


def test_a_window_needs_sinusoidal_positions():
    with pytest.raises(ConfigError, match="window"):
        PatchTransformerEncoder(12, positions="rotary", window=16)


def test_pooled_time_tokens_stop_growing_with_length_and_keep_the_mask():
    torch.manual_seed(0)
    pooled = PatchTransformerEncoder(12, patch_size=64, d_model=32, n_layers=1, n_heads=4, max_time_tokens=16).eval()
    plain = PatchTransformerEncoder(12, patch_size=64, d_model=32, n_layers=1, n_heads=4).eval()
    plain.load_state_dict(pooled.state_dict())
    short = torch.randn(1, 12, 640)  # 10 patches per lead: under the cap, encoded as without it
    with torch.no_grad():
        assert torch.equal(pooled(short).tokens, plain(short).tokens)
        out = pooled(torch.randn(2, 12, 64 * 200), torch.tensor([64 * 200, 64 * 50]))
    assert out.tokens.shape == (2, 12 * 16, 32)
    # the second item covers a quarter of the series: 4 of 16 bins per lead, the rest masked and zero
    assert out.mask.reshape(2, 12, 16).sum(-1).tolist() == [[16] * 12, [4] * 12]
    assert torch.isfinite(out.tokens).all() and not out.tokens[~out.mask].any()
