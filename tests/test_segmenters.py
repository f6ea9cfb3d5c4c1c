"""2D segmenters: TransUNet2D, UNet2D, their presets, and the config dict helpers."""

from __future__ import annotations

import io
import math

import pytest
import torch

from covidseg.models.blocks import SelfAttention
from covidseg.models.segmenters import (
    SEGMENTERS,
    make_segmenter,
    segmenter_arch,
    segmenter_config_dict,
    segmenter_from_config,
)
from covidseg.models.transunet import TRANSUNET_PRESETS, TransUNet2D
from covidseg.models.unet import UNET_PRESETS, UNet2D

ARCHS = sorted(SEGMENTERS)
PARAM_RANGES = {  # millions
    ("transunet", "tiny"): (0.3, 1.0),
    ("transunet", "small"): (3.0, 8.0),
    ("transunet", "base"): (105 * 0.7, 105 * 1.3),  # the paper's R50-ViT-B/16 has ~105 M
    ("unet", "tiny"): (0.3, 1.0),
    ("unet", "small"): (2.0, 8.0),
    ("unet", "base"): (20.0, 60.0),
}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def base_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {arch: make_segmenter(arch, "base").eval() for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_forward_shapes(arch, preset):
    torch.manual_seed(0)
    model = make_segmenter(arch, preset)
    x = torch.rand(2, 1, 64, 64)
    logits, features = model.forward_with_features(x)
    assert logits.shape == (2, 1, 64, 64)
    assert features.shape == (2, model.feature_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_base_forward_shape(arch, base_models):
    model = base_models[arch]
    with torch.no_grad():
        logits, features = model.forward_with_features(torch.rand(1, 1, 64, 64))
    assert logits.shape == (1, 1, 64, 64)
    assert features.shape == (1, model.feature_dim)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_parameter_counts(arch, preset, base_models):
    model = base_models[arch] if preset == "base" else make_segmenter(arch, preset)
    low, high = PARAM_RANGES[(arch, preset)]
    assert low <= _n_params(model) / 1e6 <= high


def test_base_transunet_is_vit_b():
    cfg = TRANSUNET_PRESETS["base"]
    assert (cfg.embed_dim, cfg.depth, cfg.heads, cfg.mlp_dim) == (768, 12, 12, 3072)
    assert cfg.encoder_channels == (64, 256, 512, 1024)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [(64, 96), (128, 128), (96, 32)])
def test_any_multiple_of_16_works(arch, size):
    model = make_segmenter(arch, "tiny").eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 1, *size))
    assert logits.shape == (1, 1, *size)


@pytest.mark.parametrize("arch", ARCHS)
def test_sizes_not_multiple_of_16_are_refused(arch):
    model = make_segmenter(arch, "tiny")
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.rand(1, 1, 72, 64))


def test_position_embedding_is_the_parameter_on_its_grid_and_resized_elsewhere():
    model = TransUNet2D(TRANSUNET_PRESETS["tiny"])  # made for 128x128 -> an 8x8 token grid
    assert model.config.token_grid == (8, 8)
    assert model.position_embedding(8, 8) is model.pos_embed
    resized = model.position_embedding(4, 6)
    assert resized.shape == (1, 24, model.config.embed_dim)
    with torch.no_grad():  # bilinear resizing keeps a constant embedding constant
        model.pos_embed.fill_(0.25)
    assert torch.allclose(model.position_embedding(5, 12), torch.full((1, 60, model.config.embed_dim), 0.25))


def test_position_embedding_interpolation_changes_the_output_only_through_the_embedding():
    torch.manual_seed(0)
    small_grid = make_segmenter("transunet", "tiny")  # made for 128x128 (an 8x8 grid)
    cfg = segmenter_config_dict(small_grid) | {"image_size": [64, 96]}
    other = segmenter_from_config("transunet", cfg)  # made for 64x96 (a 4x6 grid)
    other.load_state_dict(
        {k: v for k, v in small_grid.state_dict().items() if k != "pos_embed"}, strict=False
    )
    with torch.no_grad():
        other.pos_embed.copy_(small_grid.position_embedding(4, 6))
    x = torch.rand(1, 1, 64, 96)
    small_grid.eval()
    other.eval()
    with torch.no_grad():
        assert torch.allclose(small_grid(x), other(x), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_and_forward_agree_with_forward_with_features(arch):
    torch.manual_seed(0)
    model = make_segmenter(arch, "tiny").eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        logits, features = model.forward_with_features(x)
        assert torch.allclose(model(x), logits)
        assert torch.allclose(model.encode(x), features)
    assert features.shape == (3, model.feature_dim)


def test_transunet_features_are_the_mean_of_the_final_tokens():
    model = TransUNet2D(TRANSUNET_PRESETS["tiny"]).eval()
    x = torch.rand(2, 1, 64, 32)
    with torch.no_grad():
        _, tokens, grid = model._encode(x)
        assert grid == (4, 2) and tokens.shape == (2, 8, model.config.embed_dim)
        assert torch.allclose(model.encode(x), tokens.mean(dim=1))


@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trip_gives_identical_outputs(arch):
    torch.manual_seed(0)
    model = make_segmenter(arch, "tiny", in_channels=2).eval()
    buffer = io.BytesIO()
    torch.save(
        {"arch": segmenter_arch(model), "config": segmenter_config_dict(model), "state": model.state_dict()},
        buffer,
    )
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    again = segmenter_from_config(ckpt["arch"], ckpt["config"]).eval()
    assert again.config == model.config and again.config.in_channels == 2
    again.load_state_dict(ckpt["state"])
    x = torch.rand(2, 2, 64, 48)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_reaches_every_parameter(arch):
    torch.manual_seed(0)
    model = make_segmenter(arch, "tiny").train()
    logits, features = model.forward_with_features(torch.rand(2, 1, 64, 64))
    (logits.mean() + features.pow(2).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_attention_divides_by_sqrt_head_width():
    torch.manual_seed(0)
    attn = SelfAttention(dim=16, heads=2).eval()
    x = torch.randn(2, 5, 16)
    q, k, v = (t.reshape(2, 5, 2, 8).transpose(1, 2) for t in attn.qkv(x).chunk(3, dim=-1))  # [B, 2, N, 8]

    def manual(scale: float) -> torch.Tensor:
        weights = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # [B, 2, N, N]
        return attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))  # [B, N, 16]

    with torch.no_grad():
        assert torch.allclose(attn(x), manual(1 / math.sqrt(8)), atol=1e-6)
        assert not torch.allclose(attn(x), manual(math.sqrt(8)), atol=1e-3)


def test_make_segmenter_names_the_valid_choices():
    with pytest.raises(ValueError, match="transunet"):
        make_segmenter("vnet", "tiny")
    with pytest.raises(ValueError, match="tiny"):
        make_segmenter("unet", "huge")
    assert isinstance(make_segmenter("unet", "tiny"), UNet2D)
    assert make_segmenter("transunet", "small", in_channels=3).config.in_channels == 3
    assert set(UNET_PRESETS) == set(TRANSUNET_PRESETS) == {"tiny", "small", "base"}


def test_config_dict_is_plain_and_foreign_keys_are_refused():
    d = segmenter_config_dict(make_segmenter("transunet", "tiny"))
    assert all(isinstance(v, int | float | list) for v in d.values())
    with pytest.raises(ValueError, match="unknown unet config keys"):
        segmenter_from_config("unet", d)
    with pytest.raises(ValueError, match="not one of the segmenters"):
        segmenter_config_dict(torch.nn.Linear(2, 2))
