"""Device mesh from the parallel config: named dims ("dp_replicate", "dp_shard_mod_ep", "ep").

Expert parallelism is carved out of the data-parallel ranks: world = dp_replicate * dp_shard and
dp_shard = dp_shard_mod_ep * ep. Dense weights are sharded (FSDP2) over "dp_shard" (the flattened
dp_shard_mod_ep x ep) and replicated over "dp_replicate" (HSDP); each expert-parallel rank holds
E / ep experts, further sharded over dp_shard_mod_ep. The world size comes from the launcher, never
from the model config.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from model.config import ConfigError

DISPATCHERS = ("alltoall", "megatron_alltoall", "megatron_allgather")
ZERO3_EP_REASON = ("ZeRO-3 would partition each rank's own experts over all data-parallel ranks (DeepSpeed "
                   "partitions experts over their expert-data-parallel group only for its AutoEP layers); "
                   "use parallel.zero_stage=2")


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: world_size / dp_replicate
    ep: int = 1
    dispatcher: str = "alltoall"  # expert-parallel token dispatcher (see parallel/expert_parallel.py)
    fsdp: bool = True  # FSDP2 over the data-parallel dims (else plain replicas, DDP: parallel/fsdp.py apply_ddp)
    activation_checkpointing: bool = False  # per block
    param_dtype: str = "fp32"  # "bf16": FSDP2 mixed precision (bf16 params/compute, fp32 reduce) — GPU
    engine: str = "fsdp"  # fsdp (this module's mesh + parallel/parallelize.py) | deepspeed (ZeRO)
    zero_stage: int = 2  # engine=deepspeed: ZeRO stage 2 or 3
    # Collective timeouts (gloo and NCCL): until the first optimizer step has completed (start-up, checkpoint
    # load, compile), then for training; a rank that waits longer in a collective stops with its stacks
    # in run_dir/stalls/ (train/watchdog.py) instead of waiting torch's default 10 (NCCL) or 30 (gloo) min.
    init_timeout_s: float = 600.0
    timeout_s: float = 300.0

    def resolved(self, world_size: int, num_experts: int | None = None) -> "ParallelConfig":
        """Validate against the world size and the model's experts; fill dp_shard = -1."""
        p = "parallel"
        if self.dp_replicate < 1:
            raise ConfigError(f"{p}.dp_replicate={self.dp_replicate} must be >= 1")
        if world_size % self.dp_replicate:
            raise ConfigError(f"{p}.dp_replicate={self.dp_replicate} must divide the world size {world_size}")
        dp_shard = world_size // self.dp_replicate if self.dp_shard == -1 else self.dp_shard
        if dp_shard < 1 or self.dp_replicate * dp_shard != world_size:
            raise ConfigError(f"{p}.dp_replicate x {p}.dp_shard = {self.dp_replicate} x {dp_shard} "
                                      f"must equal the world size {world_size}")
        if self.ep < 1 or dp_shard % self.ep:
            raise ConfigError(f"{p}.ep={self.ep} must divide {p}.dp_shard={dp_shard}")
        if self.ep > 1 and not self.fsdp and self.engine == "fsdp":
            raise ConfigError(f"{p}.ep={self.ep} needs {p}.fsdp=true: without FSDP nothing reduces the dense "
                                      f"gradients across the expert-parallel ranks (use parallel=fsdp_ep)")
        if self.ep > 1 and num_experts is None:
            raise ConfigError(f"{p}.ep={self.ep} needs a MoE model (model.moe is None)")
        if num_experts is not None and num_experts % self.ep:
            raise ConfigError(f"model.moe.num_experts={num_experts} must be divisible by {p}.ep={self.ep}")
        if self.dispatcher not in DISPATCHERS:
            raise ConfigError(f"{p}.dispatcher={self.dispatcher!r} must be one of {DISPATCHERS}")
        if self.engine not in ("fsdp", "deepspeed"):
            raise ConfigError(f"{p}.engine={self.engine!r} must be 'fsdp' or 'deepspeed'")
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"{p}.zero_stage={self.zero_stage} must be 2 or 3")
        if self.engine == "deepspeed" and self.ep > 1 and self.zero_stage == 3:
            raise ConfigError(f"{p}.ep={self.ep} with {p}.zero_stage=3: {ZERO3_EP_REASON}")
        for name in ("init_timeout_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{p}.{name}={getattr(self, name)} must be > 0 (seconds)")
        if self.param_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"{p}.param_dtype={self.param_dtype!r} must be 'fp32' or 'bf16'")
        from dataclasses import replace
        return replace(self, dp_shard=dp_shard)


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str = "cpu") -> DeviceMesh:
    """3-D mesh ("dp_replicate", "dp_shard_mod_ep", "ep") with the flattened "dp_shard" and "dp" dims.
    `cfg` must be resolved."""
    mesh = init_device_mesh(device_type, (cfg.dp_replicate, cfg.dp_shard // cfg.ep, cfg.ep),
                            mesh_dim_names=("dp_replicate", "dp_shard_mod_ep", "ep"))
    mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    mesh["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp")
    return mesh
