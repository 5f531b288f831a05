"""Config validation names the bad field; presets are valid."""

import pytest

from model.config import PRESETS, ConfigError, DiTConfig, MoEConfig, get_preset


@pytest.mark.parametrize("overrides, field", [
    (dict(kv_heads=3), "model.kv_heads"),
    (dict(heads=5), "model.heads"),
    (dict(patch_size=3), "model.patch_size"),
    (dict(mask_ratio=1.0), "model.mask_ratio"),
    (dict(depth=0), "model.depth"),
    (dict(moe=dict(num_experts=0)), "model.moe.num_experts"),
    (dict(moe=dict(router="top1")), "model.moe.router"),
    (dict(moe=dict(group="image")), "model.moe.group"),
    (dict(moe=dict(capacity_factor=0.0)), "model.moe.capacity_factor"),
    (dict(moe=dict(num_experts=64, capacity_factor=0.5)), "model.moe.group_size"),
    (dict(moe=dict(router="token_choice", top_k=9)), "model.moe.top_k"),
    (dict(lr=1.0), "model.lr"),
    (dict(moe=dict(experts=2)), "model.moe.experts"),
    (dict(moe=dict(expert_matmul="cutlass")), "model.moe.expert_matmul"),
])
def test_bad_field_is_named(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        get_preset("tiny-ec", **overrides)


def test_capacity_rounding_to_zero_names_the_group():
    cfg = DiTConfig(depth=2, dim=32, heads=2, kv_heads=1, input_size=4, patch_size=2, text_dim=8,
                    mask_ratio=0.5, moe=MoEConfig(num_experts=8, group="sample", capacity_factor=1.0))
    with pytest.raises(ConfigError, match="mask_ratio"):  # 2 kept tokens * 1 / 8 experts -> 0
        cfg.validate()


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="ec-xl-8e"):
        get_preset("ec-xl-9e")


def test_all_presets_valid_and_table1_shapes():
    for cfg in PRESETS.values():
        cfg.validate()
    xl = get_preset("ec-xl-8e")
    assert (xl.depth, xl.dim, xl.heads, xl.kv_heads, xl.moe.num_experts) == (28, 1152, 18, 6, 8)
    m = get_preset("ec-m-64e")
    assert (m.depth, m.dim, m.heads, m.kv_heads, m.moe.num_experts) == (38, 3072, 48, 12, 64)
    assert get_preset("dense-m").depth == 46
    assert xl.kept_tokens == 128 and xl.num_tokens == 256  # 256px, patch 2, MaskDiT 0.5
    assert xl.moe.capacity(1024) == 256  # C = G * f_c / E


def test_get_preset_returns_independent_copies():
    a = get_preset("tiny-ec", moe=dict(num_experts=2))
    b = get_preset("tiny-ec")
    assert a.moe.num_experts == 2 and b.moe.num_experts == 4


def test_grouped_mm_needs_a_torch_that_has_it(monkeypatch):
    monkeypatch.delattr("torch._grouped_mm")
    with pytest.raises(ConfigError, match=r"^model\.moe\.expert_matmul=grouped_mm needs torch\._grouped_mm"):
        get_preset("tiny-ec", moe=dict(expert_matmul="grouped_mm"))
