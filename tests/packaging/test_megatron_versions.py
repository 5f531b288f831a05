"""parallel/megatron_dispatch.py against the installed megatron-core: the CPU shim's patch points are
checked before anything is patched."""

import pytest


def test_installed_megatron_has_the_cpu_shims_patch_points():
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from parallel.megatron_dispatch import _require_patch_points, megatron_version
    assert megatron_version().split(".")[:2] in (["0", "16"], ["0", "19"])
    _require_patch_points(MoEAlltoAllTokenDispatcher)


def test_a_dispatcher_without_the_patch_points_is_refused_by_name():
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from parallel.megatron_dispatch import _require_patch_points

    class Renamed(MoEAlltoAllTokenDispatcher):
        _maybe_dtoh_and_synchronize = None

    with pytest.raises(RuntimeError, match=r"patch points _maybe_dtoh_and_synchronize\(point, tokens_per_expert\) "
                                           r"are gone"):
        _require_patch_points(Renamed)
