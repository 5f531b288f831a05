"""`python tests/train/aligned_flow.py [overrides]`: `python -m train` with the flow loss applied to chunks of
CHUNK samples, each chunk drawing its noise, timesteps and masks from a generator seeded by the chunk's
position in the data stream. The random draws then depend only on which samples an optimizer step sees,
not on how they are split into micro-batches (the trainer's own flow RNG draws per call)."""

import runpy
import sys

import torch

import model.flow as flow

CHUNK = 2  # images; with the tests' model.moe.group_size=256 and 128 kept tokens each, one routing group
_loss = flow.flow_loss
_chunks = 0


def chunked_flow_loss(model, x0_BCHW, ctx_BLT, ctx_mask_BL, cfg, generator=None, **kwargs) -> dict:
    """flow_loss averaged over chunks of CHUNK samples (each its own forward), ignoring `generator`."""
    global _chunks
    outs = []
    for i in range(0, x0_BCHW.shape[0], CHUNK):
        gen = torch.Generator(device=x0_BCHW.device).manual_seed(_chunks)
        _chunks += 1
        mask = None if ctx_mask_BL is None else ctx_mask_BL[i:i + CHUNK]
        outs.append(_loss(model, x0_BCHW[i:i + CHUNK], ctx_BLT[i:i + CHUNK], mask, cfg, generator=gen, **kwargs))
    return {"loss": sum(o["loss"] for o in outs) / len(outs),
            "flow_loss": sum(o["flow_loss"] for o in outs) / len(outs),
            "aux_loss": sum(o["aux_loss"] for o in outs) / len(outs),
            "t": torch.cat([o["t"] for o in outs]), "out": outs[-1]["out"]}


if __name__ == "__main__":
    flow.flow_loss = chunked_flow_loss  # before train.trainer imports it
    sys.argv = ["train", *sys.argv[1:]]
    runpy.run_module("train", run_name="__main__", alter_sys=True)
