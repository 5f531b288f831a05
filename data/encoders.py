"""Frozen encoders: text (T5 or the embedded MiniLM, through transformers) and VAE (diffusers AutoencoderKL or
the identity `pixel` VAE). Eval mode, no grads, bf16 on a bf16-capable GPU, fp32 otherwise.

    text = load_text_encoder(cfg, device)   # text(captions) -> emb [B, L, Dt] (zeros at padding), mask [B, L]
    vae = load_vae(cfg, device)             # vae.encode(images [B,3,H,W] in [-1,1]) -> latents [B,C,H/f,W/f]
    enc = FrozenEncoders(cfg, device)       # batch transform for the loaders: adds "latent" and "text_emb"
    enc = online_encoders(cfg, device, use_bf16)  # the ones a loader of cfg.kind needs online (or None)
"""

from __future__ import annotations

import torch

from data.config import DataConfig, text_encoder_path


def resolve_dtype(name: str, device) -> torch.dtype:
    """'auto' -> bf16 on a CUDA device that supports it, else fp32."""
    if name == "bf16":
        return torch.bfloat16
    if name == "fp32":
        return torch.float32
    dev = torch.device(device)
    return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class TextEncoder:
    """Tokenizer + frozen encoder. The padding mask goes to cross-attention with the embeddings."""

    def __init__(self, kind: str, path: str, max_len: int, device="cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoModel, AutoTokenizer, T5EncoderModel

        self.kind, self.path, self.max_len, self.device, self.dtype = kind, path, max_len, torch.device(device), dtype
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        cls = T5EncoderModel if kind == "t5" else AutoModel  # MiniLM: a BertModel
        self.model = _freeze(cls.from_pretrained(path, dtype=dtype).to(self.device))
        conf = self.model.config
        self.dim = int(getattr(conf, "d_model", None) or conf.hidden_size)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids long [B, max_len], mask bool [B, max_len] (True = real token)."""
        tok = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"].bool()

    @torch.no_grad()  # not inference_mode: its tensors could not enter the (differentiable) training graph
    def encode(self, ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        """Token ids + mask -> embeddings [B, L, Dt] in the encoder's dtype, zero at padded positions."""
        ids_BL, mask_BL = ids_BL.to(self.device), mask_BL.to(self.device)
        B, L = ids_BL.shape
        n = max(1, int(mask_BL.sum(1).max()))  # run on the longest caption only; padding is masked anyway
        out = self.model(input_ids=ids_BL[:, :n], attention_mask=mask_BL[:, :n].long()).last_hidden_state  # [B, n, Dt]
        emb = out.new_zeros(B, L, out.shape[-1])
        emb[:, :n] = out * mask_BL[:, :n, None].to(out.dtype)
        return emb  # [B, L, Dt]

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)
        return self.encode(ids, mask), mask.to(self.device)


class PixelVAE:
    """Identity "VAE": latents are the images in [-1, 1] (3 channels, full size). Exact round trip."""

    latent_channels, downsample, scaling_factor = 3, 1, 1.0

    def __init__(self, device="cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return images_BCHW.to(self.device, torch.float32)

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        return latents_BCHW.float().clamp(-1, 1)


class KLVAE:
    """diffusers AutoencoderKL, normalised as its own config says (the posterior mean: deterministic).

    encode: z = (mean - latents_mean) / latents_std * scaling_factor per channel when the config has
    latents_mean and latents_std (diffusers' SDXL pipelines), else (mean - shift_factor) * scaling_factor
    (SD3/Flux; shift 0 when absent); decode inverts it. force_upcast (SDXL-style VAEs overflow in half
    precision) keeps the VAE in fp32 whatever `dtype` the run asks for.
    """

    def __init__(self, path: str, device="cpu", dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL

        conf = AutoencoderKL.load_config(path)
        self.device = torch.device(device)
        self.dtype = torch.float32 if conf.get("force_upcast", True) else dtype
        self.model = _freeze(AutoencoderKL.from_pretrained(path, torch_dtype=self.dtype).to(self.device))
        conf = self.model.config
        self.latent_channels = int(conf.latent_channels)
        self.downsample = 2 ** (len(conf.block_out_channels) - 1)
        self.scaling_factor = float(conf.scaling_factor)
        self.shift_C11, self.std_C11 = self._channel_stats(conf)

    def _channel_stats(self, conf) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (offset, spread) [C, 1, 1] in fp32: latents_mean/std if both given, else (shift_factor, 1)."""
        C = self.latent_channels
        mean, std = getattr(conf, "latents_mean", None), getattr(conf, "latents_std", None)
        if mean is not None and std is not None:
            if len(mean) != C or len(std) != C:
                raise ValueError(f"VAE config: latents_mean/latents_std have {len(mean)}/{len(std)} entries, "
                                 f"expected latent_channels={C}")
            return (torch.tensor(mean, dtype=torch.float32, device=self.device).view(C, 1, 1),
                    torch.tensor(std, dtype=torch.float32, device=self.device).view(C, 1, 1))
        shift = float(getattr(conf, "shift_factor", None) or 0.0)
        return (torch.full((C, 1, 1), shift, device=self.device), torch.ones(C, 1, 1, device=self.device))

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> normalised latents fp32 [B, C, H/f, W/f]."""
        x = images_BCHW.to(self.device, self.dtype)
        z = self.model.encode(x).latent_dist.mean.float()  # [B, C, H/f, W/f]
        return (z - self.shift_C11) / self.std_C11 * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, h, w] -> images fp32 [B, 3, h*f, w*f] in [-1, 1]."""
        z = latents_BCHW.to(self.device, torch.float32) * self.std_C11 / self.scaling_factor + self.shift_C11
        return self.model.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)  # [B, 3, H, W]


def load_text_encoder(cfg: DataConfig, device="cpu") -> TextEncoder:
    """cfg.text_encoder 'minilm' (embedded, offline) or 't5' (cfg.text_encoder_path: name or local dir)."""
    return TextEncoder(cfg.text_encoder, text_encoder_path(cfg), cfg.max_text_len, device,
                       resolve_dtype(cfg.encoder_dtype, device))


def load_vae(cfg: DataConfig, device="cpu"):
    """cfg.vae 'pixel' (identity) or 'kl' (AutoencoderKL from cfg.vae_path)."""
    dtype = resolve_dtype(cfg.encoder_dtype, device)
    return PixelVAE(device, dtype) if cfg.vae == "pixel" else KLVAE(cfg.vae_path, device, dtype)


class FrozenEncoders:
    """Loader transform run in the main process (on `device`): adds "latent" from "image" and "text_emb"
    from "text_ids" + "text_mask". Each part can be switched off."""

    def __init__(self, cfg: DataConfig, device="cpu", text: bool = True, vae: bool = True):
        self.text = load_text_encoder(cfg, device) if text else None
        self.vae = load_vae(cfg, device) if vae else None
        self.device = torch.device(device)

    def __call__(self, batch: dict) -> dict:
        if self.vae is not None and "image" in batch:
            batch["latent"] = self.vae.encode(batch["image"])
        if self.text is not None and "text_ids" in batch:
            batch["text_emb"] = self.text.encode(batch["text_ids"], batch["text_mask"])
            batch["text_mask"] = batch["text_mask"].to(self.device)
        return batch


def online_encoders(dcfg: DataConfig, device, use_bf16: bool) -> FrozenEncoders | None:
    """The encoders the data needs online, in the run's autocast dtype (encoder_dtype=auto): text + VAE for
    image shards, the text encoder for latent shards with token ids (text_storage ids, or unknown)."""
    if dcfg.kind == "latent" and dcfg.text_storage == "emb":
        return None
    if dcfg.encoder_dtype == "auto":
        dcfg = dcfg.replace(encoder_dtype="bf16" if use_bf16 else "fp32")
    return FrozenEncoders(dcfg, device, vae=dcfg.kind == "image")


def save_random_t5(out: str, captions, d_model: int = 64, layers: int = 2, seed: int = 0) -> str:
    """Write a random T5EncoderModel (d_ff 2 * d_model, 4 heads) with a word-level tokenizer trained on
    `captions` to the folder `out` (for `text_encoder="t5"`): a text encoder made offline, without
    downloads, for tests and benchmarks. Returns `out`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(captions), trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(T5Config(vocab_size=fast.vocab_size, d_model=d_model, d_ff=2 * d_model,
                                        num_layers=layers, num_heads=4, d_kv=d_model // 4, pad_token_id=0))
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
