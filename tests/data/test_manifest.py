"""manifest.json next to latent shards: settings taken from it, a disagreeing run config refused naming the
field and both values, and data without a manifest left alone."""

import pytest

from data.config import DataConfig
from data.manifest import ManifestMismatch, apply_manifest, write_manifest


def _manifest(tiny_t5, tiny_vae, **over):
    settings = dict(text_encoder="t5", text_encoder_path=tiny_t5, vae="kl", vae_path=tiny_vae, image_size=64,
                    max_text_len=12, text_storage="ids", latent_dtype="bf16")
    return {**dict(settings=settings, latent_shape=[8, 16, 16], latent_dtype="bf16", text_storage="ids", text_dim=64),
            **over}


@pytest.fixture
def shards(tmp_path, tiny_t5, tiny_vae):
    write_manifest(str(tmp_path), _manifest(tiny_t5, tiny_vae))
    return str(tmp_path / "part-{000000..000003}.tar")


def test_settings_come_from_the_manifest(shards, tiny_t5, tiny_vae):
    cfg = apply_manifest(DataConfig(kind="latent", shards=shards, batch_size=4))
    assert (cfg.text_storage, cfg.text_encoder, cfg.text_encoder_path, cfg.vae, cfg.vae_path, cfg.image_size,
            cfg.max_text_len, cfg.batch_size) == ("ids", "t5", tiny_t5, "kl", tiny_vae, 64, 12, 4)
    agreeing = DataConfig(kind="latent", shards=shards, vae="kl", vae_path=tiny_vae, max_text_len=8)
    assert apply_manifest(agreeing) == agreeing.replace(text_storage="ids", text_encoder="t5",
                                                        text_encoder_path=tiny_t5, image_size=64)  # 8: truncation


def test_a_disagreeing_field_fails_naming_it_and_both_values(shards, tmp_path, tiny_t5, tiny_vae):
    manifest = tmp_path / "manifest.json"
    with pytest.raises(ManifestMismatch) as e:
        apply_manifest(DataConfig(kind="latent", shards=shards, vae="kl", vae_path="other/vae"))
    assert str(e.value) == f"data.vae_path='other/vae' disagrees with manifest.json vae_path {tiny_vae!r} ({manifest})"
    with pytest.raises(ManifestMismatch, match=r"^data.text_storage='emb' disagrees with manifest.json "
                                               r"text_storage 'ids'"):
        apply_manifest(DataConfig(kind="latent", shards=shards, text_storage="emb"))
    write_manifest(str(tmp_path), _manifest(tiny_t5, tiny_vae, latent_shape=[8, 8, 8]))
    with pytest.raises(ManifestMismatch, match=r"gives latents \[8, 16, 16\] at data.image_size=64, but manifest.json "
                                               r"latent_shape is \[8, 8, 8\]"):
        apply_manifest(DataConfig(kind="latent", shards=shards))


def test_validate_app_refuses_a_mismatch_before_anything_is_built(shards):
    from model.config import ConfigError
    from train.config import AppConfig, validate_app

    cfg = AppConfig()
    cfg.data = DataConfig(kind="latent", shards=shards, image_size=128)
    with pytest.raises(ConfigError, match=r"^data.image_size=128 disagrees with manifest.json image_size 64 \("):
        validate_app(cfg, 1)
    cfg.data = DataConfig(kind="latent", shards=shards)
    mcfg, _ = validate_app(cfg, 1)
    assert cfg.data.text_storage == "ids" and (mcfg.in_channels, mcfg.input_size, mcfg.text_dim) == (8, 16, 64)


def test_encoders_this_machine_lacks_fail_in_one_line(tmp_path, tiny_t5):
    write_manifest(str(tmp_path), _manifest(tiny_t5, str(tmp_path / "gone")))
    with pytest.raises(ValueError, match=f"^data.vae_path='{tmp_path}/gone' "):
        apply_manifest(DataConfig(kind="latent", shards=str(tmp_path / "l-0.tar")))


def test_without_a_manifest_the_config_is_unchanged(tmp_path):
    for shards in (str(tmp_path / "l-{0..3}.tar"), "pipe:cat /nowhere/l-{0..3}.tar", ""):
        cfg = DataConfig(kind="latent", shards=shards)
        assert apply_manifest(cfg) is cfg
