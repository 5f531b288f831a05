"""EC-DiT: the network (dit.py: attention.py, layers.py, moe.py, routing.py), the rectified-flow objective
and sampler (flow.py), configs (config.py), parameter counts (params.py) and FLOPs (flops.py).

Tensor names carry their shape, one letter per dim (x_BSD: [B, S, D]). Each letter means one thing, here
and in parallel/:

    B     images in a batch                    D     model width
    C     latent channels                      F     FFN hidden width (dense, or of one expert)
    H, W  latent height and width              P     values of one patch token (p * p * C)
    S     tokens of one image                  E     experts (E_local: those of one expert-parallel rank)
    K     tokens kept by MaskDiT, per image    X     slots of one expert in a routing plan (X = N * Q)
    T     routed tokens: the flattened local   N     routing groups of a plan
          batch (B * S, or B * K)              G     tokens of one routing group
    L     text length                          Q     capacity: slots of one expert in one group
    Y     text width (the paper's d_y)         A     experts a token picks in token choice (top-k)
    R     rows of megatron's dispatch: (token, expert) pairs sorted by expert
    I, J  inner and outer width of a generic batched matmul (moe.grouped_mm)

Attention heads are written out ([B, heads, S, head_dim]); a digit is a factor (kv_BL2D: [B, L, 2 * D]).
"""
