"""Frozen encoders through the real loading code: tiny random T5 / AutoencoderKL from config, the embedded MiniLM."""

import pytest
import torch

from data.config import DataConfig, DataShapes, data_shapes
from data.encoders import FrozenEncoders, load_text_encoder, load_vae


def test_tiny_t5_embeddings_mask_and_padding_invariance(tiny_t5):
    from transformers import T5EncoderModel

    cfg = DataConfig(text_encoder="t5", text_encoder_path=tiny_t5, max_text_len=12)
    enc = load_text_encoder(cfg)
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    caps = ["two red circles left of a blue square", "a circle"]
    emb, mask = enc(caps)
    assert emb.shape == (2, 12, 64) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [len(enc.tokenizer(c)["input_ids"]) for c in caps] == [8, 2]
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()
    ref = T5EncoderModel.from_pretrained(tiny_t5).eval()
    ids = enc.tokenizer(caps[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        alone = ref(input_ids=ids).last_hidden_state[0]  # [2, 64]: unpadded, independent of the batch
    torch.testing.assert_close(emb[1, :2], alone, rtol=1e-5, atol=1e-5)
    assert data_shapes(cfg).text_dim == 64


def test_minilm_loads_offline_and_matches_automodel():
    from transformers import AutoModel

    from data.config import minilm_path

    cfg = DataConfig(max_text_len=16)
    enc = load_text_encoder(cfg)
    emb, mask = enc(["a red circle", "three blue squares above a green triangle"])
    assert emb.shape == (2, 16, 384) == (2, 16, data_shapes(cfg).text_dim)
    ids, m = enc.tokenize(["three blue squares above a green triangle"])
    with torch.no_grad():
        ref = AutoModel.from_pretrained(minilm_path()).eval()(input_ids=ids, attention_mask=m.long()).last_hidden_state
    n = int(m.sum())
    torch.testing.assert_close(emb[1, :n], ref[0, :n], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(emb[0, 1], emb[1, 1])  # different captions, different embeddings


def test_tiny_kl_vae_encode_decode(tiny_vae):
    from diffusers import AutoencoderKL

    cfg = DataConfig(vae="kl", vae_path=tiny_vae, image_size=64)
    vae = load_vae(cfg)
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (8, 4, 0.5)
    assert not vae.model.training and not any(p.requires_grad for p in vae.model.parameters())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = vae.encode(x)
    shapes = data_shapes(cfg)
    assert z.shape == (2, shapes.latent_channels, shapes.latent_size, shapes.latent_size) == (2, 8, 16, 16)
    ref = AutoencoderKL.from_pretrained(tiny_vae).eval()
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        torch.testing.assert_close(z, mean * 0.5)
        torch.testing.assert_close(vae.decode(z), ref.decode(mean).sample.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_pixel_vae_is_exact_and_frozen_encoders_transform(tiny_t5):
    cfg = DataConfig(text_encoder="t5", text_encoder_path=tiny_t5, max_text_len=8)
    vae = load_vae(cfg)
    x = torch.randint(0, 256, (3, 3, 32, 32)).float() / 127.5 - 1
    assert torch.equal(vae.decode(vae.encode(x)), x)
    assert data_shapes(cfg) == DataShapes(latent_channels=3, latent_size=32, text_dim=64, max_text_len=8)
    enc = FrozenEncoders(cfg)
    ids, mask = enc.text.tokenize(["a square", "two green circles"])
    batch = enc(dict(image=x[:2], text_ids=ids, text_mask=mask))
    assert torch.equal(batch["latent"], x[:2])
    torch.testing.assert_close(batch["text_emb"], enc.text(["a square", "two green circles"])[0])


def test_default_shapes_are_the_embedded_set(tiny_vae):
    assert data_shapes() == DataShapes(latent_channels=3, latent_size=32, text_dim=384, max_text_len=32)
    with pytest.raises(ValueError, match="data.image_size=30"):
        data_shapes(DataConfig(vae="kl", vae_path=tiny_vae, image_size=30))  # not divisible by the 4x downsampling


def _save_vae(path, **config) -> str:
    """The tiny AutoencoderKL of the tiny_vae fixture with extra config fields, saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(latent_channels=8, block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, **config).save_pretrained(path)
    return str(path)


def test_kl_vae_per_channel_latents_mean_std(tmp_path):
    from diffusers import AutoencoderKL

    mean_C, std_C = [0.1 * c - 0.3 for c in range(8)], [0.5 + 0.25 * c for c in range(8)]
    path = _save_vae(tmp_path / "vae", scaling_factor=0.5, shift_factor=0.7, latents_mean=mean_C, latents_std=std_C)
    vae = load_vae(DataConfig(vae="kl", vae_path=path, image_size=32))
    x_B3HW = torch.rand(2, 3, 32, 32) * 2 - 1
    z_BCHW = vae.encode(x_B3HW)
    ref = AutoencoderKL.from_pretrained(path).eval()
    with torch.no_grad():
        raw_BCHW = ref.encode(x_B3HW).latent_dist.mean
        m, s = torch.tensor(mean_C).view(1, 8, 1, 1), torch.tensor(std_C).view(1, 8, 1, 1)
        torch.testing.assert_close(z_BCHW, (raw_BCHW - m) / s * 0.5)  # SDXL's convention; shift_factor unused
        torch.testing.assert_close(vae.decode(z_BCHW), ref.decode(raw_BCHW).sample.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    shifted = load_vae(DataConfig(vae="kl", vae_path=_save_vae(tmp_path / "sd3", scaling_factor=0.5, shift_factor=0.7),
                                  image_size=32))
    torch.testing.assert_close(shifted.encode(x_B3HW), (raw_BCHW - 0.7) * 0.5)  # SD3's convention without mean/std
    with pytest.raises(ValueError, match="latents_mean/latents_std have 3/3 entries, expected latent_channels=8"):
        load_vae(DataConfig(vae="kl", vae_path=_save_vae(tmp_path / "bad", latents_mean=[0.0] * 3,
                                                         latents_std=[1.0] * 3), image_size=32))


@pytest.mark.parametrize("force_upcast, dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_kl_vae_force_upcast_keeps_fp32_in_a_bf16_run(tmp_path, force_upcast, dtype):
    path = _save_vae(tmp_path / "vae", force_upcast=force_upcast)
    vae = load_vae(DataConfig(vae="kl", vae_path=path, image_size=32, encoder_dtype="bf16"))
    assert vae.dtype == dtype and {p.dtype for p in vae.model.parameters()} == {dtype}
    z_BCHW = vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert z_BCHW.dtype == torch.float32 and vae.decode(z_BCHW).shape == (1, 3, 32, 32)


def test_encoder_paths_that_cannot_load_name_the_field(tmp_path, tiny_vae):
    import shutil

    from data.config import data_shapes, text_dim

    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_vae, pipeline / "vae")
    with pytest.raises(ValueError, match=r"data.vae_path='.*pipeline' is a diffusers pipeline: give its VAE, "
                                         r"data.vae_path='.*pipeline/vae'"):
        data_shapes(DataConfig(vae="kl", vae_path=str(pipeline)))
    with pytest.raises(ValueError, match=r"data.vae_path='.*empty' has no config.json"):
        (tmp_path / "empty").mkdir()
        data_shapes(DataConfig(vae="kl", vae_path=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match=r"data.text_encoder_path='no-such/model' has no config.json and cannot be "
                                         r"fetched"):
        text_dim(DataConfig(text_encoder="t5", text_encoder_path="no-such/model"))
