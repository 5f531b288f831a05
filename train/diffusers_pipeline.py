"""EC-DiT as a diffusers model and pipeline (written by `python -m train.export --format diffusers`).

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("export-diffusers/", trust_remote_code=True)
    image = pipe("a red circle", num_inference_steps=20, guidance_scale=4.0, seed=0).images[0]

This module is the source of the folder's code files: train/diffusers_code.py generates
`pipeline_ecdit.py` (ECDiTPipeline) and `transformer/modeling_ecdit.py` (ECDiTTransformer2DModel) from
its classes and what they use of model/ and train/, so that stock diffusers loads the folder without this
repository. In this repository `ECDiTPipeline.from_pretrained(folder)` loads the folder with these classes
instead (no code of the folder is run), and `save_pretrained` writes the same layout as the export.

`ECDiTTransformer2DModel` (ModelMixin + ConfigMixin) holds our `model.dit.DiT`, built from the DiTConfig
dict in its config: every router (expert choice, token choice, DiffMoE, dense), the routers' dynamic
thresholds (buffers) and the grouped experts. `ECDiTPipeline` adds the text encoder and tokenizer, the
VAE (none for the identity `pixel` VAE) and diffusers' `FlowMatchEulerDiscreteScheduler`, and samples as
train.sample does: per-prompt noise seeded with (seed, i), CFG with the learned null text, Euler steps
on the shifted schedule t_i = shift * s_i / (1 + (shift - 1) * s_i), s = linspace(1, 0, steps + 1), and
the MoE inference routing of train/generate.py. Imports torch, diffusers and the model package only.
The transformer keeps its routers (weights, thresholds) in fp32 when loaded with a `torch_dtype`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from model.config import config_from_dict, config_to_dict
from model.dit import DiT
from model.flow import cfg_velocity
from model.routing import InferenceRouting, LoadMeter
from train.diffusers_code import generate
from train.generate import SampleError, _check_group_size, inference_routing, prompt_noise
from train.visualize import to_uint8

# Version of the folder layout and configs written here; a folder of another version is refused.
# 2: diffusers' custom-code layout (the code files below, named in model_index.json).
EXPORT_VERSION = 2
# The folder's code files: diffusers' module names (the pipeline's at the folder root, the transformer's in
# transformer/), as model_index.json names them.
PIPELINE_MODULE, MODELING_MODULE = "pipeline_ecdit", "modeling_ecdit"
# Submodules (by attribute name) whose parameters and buffers stay fp32 under from_pretrained's torch_dtype:
# the routers decide discrete choices (their thresholds are compared with fp32 scores).
FP32_MODULES = ("router",)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# FlowMatchEulerDiscreteScheduler options that would leave our schedule (model/flow.py timesteps).
SCHEDULER_OFF = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                 "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


class ExportVersionError(ValueError):
    """A diffusers export written by another export version."""


def check_export_version(version, where: str) -> None:
    """Refuse an export whose recorded export_version is not EXPORT_VERSION (one line)."""
    if version != EXPORT_VERSION:
        raise ExportVersionError(
            f"{where}: export_version {version} (this code reads export_version {EXPORT_VERSION}); export the "
            f"checkpoint again with python -m train.export --format diffusers")


def _check_folder_version(path, config_file: str) -> None:
    """Check a local export folder's version before diffusers loads anything from it."""
    f = Path(path) / config_file
    if f.is_file():
        check_export_version(json.loads(f.read_text()).get("export_version"), str(f))


class ECDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """Our DiT (`self.dit`) behind diffusers' save/load; the config's `dit_config` is the DiTConfig dict and
    `weights` says which weights were exported ("ema" or "raw")."""

    @register_to_config
    def __init__(self, dit_config: dict | None = None, weights: str = "raw", export_version: int | None = None,
                 auto_map: dict | None = None):
        super().__init__()
        check_export_version(export_version, "transformer config")
        if not isinstance(dit_config, dict):
            raise ValueError("transformer config: dit_config must be the model's DiTConfig dict")
        self.dit = DiT(config_from_dict(dit_config))
        # read by diffusers' .to() warning and dtype look-up; from_pretrained below does the keeping (diffusers'
        # own class-level _keep_in_fp32_modules would make loading without accelerate fail)
        self._keep_in_fp32_modules = list(FP32_MODULES)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' from_pretrained; with `torch_dtype`, every floating tensor is cast to it except those of
        FP32_MODULES (the routers), which are fp32."""
        _check_folder_version(Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or ""), "config.json")
        dtype = kwargs.pop("torch_dtype", None)
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        keep = set(FP32_MODULES)
        with torch.no_grad():  # own storage per tensor: diffusers may leave unaligned views of the file's
            for name, t in [*model.named_parameters(), *model.named_buffers()]:  # buffer (CPU matmul rounding)
                if dtype is None or not t.is_floating_point():
                    t.data = t.data.clone()
                else:
                    t.data = t.data.to(torch.float32 if keep & set(name.split(".")) else dtype, copy=True)
        return model

    @classmethod
    def from_dit(cls, model: DiT, weights: str = "raw") -> "ECDiTTransformer2DModel":
        """Wrap a built DiT (its parameters are shared, not copied)."""
        with torch.device("meta"):
            wrapper = cls(dit_config=config_to_dict(model.cfg), weights=weights, export_version=EXPORT_VERSION,
                          auto_map={"AutoModel": f"{MODELING_MODULE}.ECDiTTransformer2DModel"})
        wrapper.dit = model
        return wrapper

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, text_drop: torch.Tensor | None = None,
                routing: InferenceRouting | None = None, return_dict: bool = True):
        """Velocity [B, C, H, W] for x_t [B, C, H, W] at t [B] in [0, 1] (1 = noise) with text [B, L, Y],
        mask [B, L] (True = attend), CFG drop flags [B] and the eval-mode MoE routing (None: the config's)."""
        pred = self.dit(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                        text_drop_B=text_drop, collect_stats=False, routing=routing).pred
        return Transformer2DModelOutput(sample=pred) if return_dict else (pred,)


class ECDiTPipeline(DiffusionPipeline):
    """Text-to-image with an EC-DiT: text encoder -> transformer (CFG, Euler steps of the scheduler) -> VAE.

    `transformer` is an ECDiTTransformer2DModel; `vae` None is the identity `pixel` VAE (latents are the images in [-1, 1]); an AutoencoderKL is
    used as train.sample uses it (latents_mean / latents_std per channel, else shift_factor, and
    scaling_factor; fp32 when its config says force_upcast). `max_text_len` is the tokenizer's padded
    length of the training run.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: ModelMixin, scheduler: FlowMatchEulerDiscreteScheduler,
                 text_encoder, tokenizer, vae=None, max_text_len: int | None = None,
                 export_version: int | None = None):
        super().__init__()
        check_export_version(export_version, "model_index.json")
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, vae=vae)
        self.register_to_config(max_text_len=max_text_len or transformer.dit.cfg.text_len,
                                export_version=export_version)

    # ---- in this repository (left out of the generated code) -------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None, **components):
        """Load a local export folder with this module's classes (its code files are not run): the
        transformer with `torch_dtype` (routers fp32), the text encoder and VAE with `torch_dtype`, the
        tokenizer and scheduler as saved. `components` (transformer=, vae=, ...) replace the folder's."""
        folder = Path(pretrained_model_name_or_path)
        _check_folder_version(folder, "model_index.json")
        index = json.loads((folder / "model_index.json").read_text())
        parts = {}
        for name in ("transformer", "scheduler", "text_encoder", "tokenizer", "vae"):
            if name in components:
                parts[name] = components.pop(name)
                continue
            library, class_name = index.get(name) or (None, None)
            if class_name is None:
                parts[name] = None
            elif name == "transformer":
                parts[name] = ECDiTTransformer2DModel.from_pretrained(folder / name, torch_dtype=torch_dtype)
            else:
                kw = {} if torch_dtype is None or name in ("scheduler", "tokenizer") else (
                    {"dtype": torch_dtype} if library == "transformers" else {"torch_dtype": torch_dtype})
                parts[name] = getattr(importlib.import_module(library), class_name).from_pretrained(folder / name, **kw)
        if components:
            raise TypeError(f"ECDiTPipeline.from_pretrained: unknown arguments {sorted(components)}")
        pipe = cls(**parts, max_text_len=index.get("max_text_len"), export_version=index.get("export_version"))
        pipe.register_to_config(_name_or_path=str(folder))
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' save_pretrained, in the export's layout: the generated code files, and model_index.json
        naming them (stock diffusers loads the folder with trust_remote_code=True)."""
        super().save_pretrained(save_directory, **kwargs)
        write_code_files(save_directory)

    # ---- pieces ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings [B, L, Y] (zero at padding) and mask [B, L], as data.encoders.TextEncoder: padded
        to max_text_len, the encoder run on the longest caption's tokens only."""
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.config.max_text_len, return_tensors="pt")
        dev = self.text_encoder.device
        ids_BL, mask_BL = tok["input_ids"].to(dev), tok["attention_mask"].bool().to(dev)
        B, L = ids_BL.shape
        n = max(1, int(mask_BL.sum(1).max()))
        out_BnY = self.text_encoder(input_ids=ids_BL[:, :n], attention_mask=mask_BL[:, :n].long()).last_hidden_state
        emb_BLY = out_BnY.new_zeros(B, L, out_BnY.shape[-1])
        emb_BLY[:, :n] = out_BnY * mask_BL[:, :n, None].to(out_BnY.dtype)
        return emb_BLY, mask_BL

    @torch.no_grad()
    def decode_latents(self, latents_NCHW: torch.Tensor) -> torch.Tensor:
        """Latents -> images fp32 [N, 3, H, W] in [-1, 1]."""
        if self.vae is None:
            return latents_NCHW.float().clamp(-1, 1)
        conf, dev = self.vae.config, self.vae.device
        if conf.get("force_upcast", True) and self.vae.dtype != torch.float32:
            self.vae.to(torch.float32)
        C = int(conf.latent_channels)
        mean, std = conf.get("latents_mean"), conf.get("latents_std")
        if mean is not None and std is not None:
            shift_C11 = torch.tensor(mean, dtype=torch.float32, device=dev).view(C, 1, 1)
            std_C11 = torch.tensor(std, dtype=torch.float32, device=dev).view(C, 1, 1)
        else:
            shift_C11 = torch.full((C, 1, 1), float(conf.get("shift_factor") or 0.0), device=dev)
            std_C11 = torch.ones(C, 1, 1, device=dev)
        z = latents_NCHW.to(dev, torch.float32) * std_C11 / float(conf.scaling_factor) + shift_C11
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    def _check_call(self, prompts: list[str], steps: int, routing: str, group_size: int | None,
                    dynamic_multiplier: float | None, batch_size: int, output_type: str) -> None:
        if not prompts:
            raise SampleError("prompt: no prompts to sample")
        for name, v in (("num_inference_steps", steps), ("batch_size", batch_size)):
            if v < 1:
                raise SampleError(f"{name}={v} must be >= 1")
        if output_type not in OUTPUT_TYPES:
            raise SampleError(f"output_type={output_type!r} must be one of {OUTPUT_TYPES}")
        if group_size is not None and (routing != "tokens" or group_size < 1):
            raise SampleError(f"group_size={group_size} needs routing='tokens' and a value >= 1")
        if dynamic_multiplier is not None and (routing != "dynamic" or dynamic_multiplier <= 0):
            raise SampleError(f"dynamic_multiplier={dynamic_multiplier} needs routing='dynamic' and a value > 0")
        for flag in SCHEDULER_OFF:
            if self.scheduler.config.get(flag):
                raise SampleError(f"scheduler config {flag}={self.scheduler.config.get(flag)}: must be off to follow "
                                  f"the training sampler's schedule")
        cfg = self.transformer.dit.cfg
        if routing == "tokens" and cfg.moe is not None:
            N = len(prompts)
            _check_group_size(routing, group_size or cfg.moe.inference_group_size,
                              {min(batch_size, N), N % batch_size or batch_size}, cfg.num_tokens)

    # ---- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float = 4.0,
                 seed: int = 0, shift: float | None = None, routing: str = "sample", group_size: int | None = None,
                 dynamic_multiplier: float | None = None, batch_size: int = 8, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, meter: LoadMeter | None = None):
        """Images for `prompt` with `num_inference_steps` Euler steps and CFG scale `guidance_scale`.

        Prompt i starts from train.generate's noise of (seed, i) unless `latents` [N, C, h, w] are given.
        `shift`: the schedule's time shift (None: the scheduler config's). `routing` is the MoE inference
        routing ("sample": capacity per image; "dynamic": per-expert thresholds x `dynamic_multiplier`;
        "tokens": groups of `group_size` tokens across the CFG batch of `batch_size` prompts; "batch");
        `meter` records the expert work. output_type: "pil", "np" / "pt" (in [0, 1], NHWC / NCHW) or
        "latent".
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self._check_call(prompts, num_inference_steps, routing, group_size, dynamic_multiplier, batch_size,
                         output_type)
        dit: DiT = self.transformer.dit
        cfg = dit.cfg
        p = next(dit.parameters())
        device, dtype = p.device, p.dtype
        shape_CHW = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if latents is not None and tuple(latents.shape) != (len(prompts), *shape_CHW):
            raise SampleError(f"latents {tuple(latents.shape)} must be {(len(prompts), *shape_CHW)}")
        self.scheduler.set_shift(self.scheduler.config.shift if shift is None else shift)
        s = torch.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]  # the shift is the scheduler's
        out = []
        with inference_routing(dit, routing, group_size, dynamic_multiplier, meter) as net:
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                emb_BLY, mask_BL = self.encode_prompt(batch)
                emb_BLY, mask_BL = emb_BLY.to(device, dtype), mask_BL.to(device)
                x = (latents[start:start + len(batch)] if latents is not None
                     else torch.stack([prompt_noise(seed, start + j, shape_CHW) for j in range(len(batch))]))
                x = x.to(device, dtype)
                velocity = cfg_velocity(net, emb_BLY, mask_BL, guidance_scale)
                self.scheduler.set_timesteps(sigmas=s.numpy(), device=device)
                for i, t in enumerate(self.scheduler.timesteps):
                    v = velocity(x, self.scheduler.sigmas[i].expand(x.shape[0]))  # t in [0, 1], fp32
                    x = self.scheduler.step(v, t, x).prev_sample
                out.append(x.float().cpu())
        latents_NCHW = torch.cat(out)
        if output_type == "latent":
            images = latents_NCHW
        else:
            images_NCHW = torch.cat([self.decode_latents(latents_NCHW[i:i + batch_size])
                                     for i in range(0, len(prompts), batch_size)])
            if output_type == "pil":
                images = [Image.fromarray(a) for a in to_uint8(images_NCHW)]  # as train.sample's PNGs
            elif output_type == "pt":
                images = (images_NCHW + 1) / 2
            else:
                images = ((images_NCHW + 1) / 2).permute(0, 2, 3, 1).numpy()
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


# ---- the folder's code files ------------------------------------------------------------------------

# Methods that only make sense in this repository: left out of the generated code.
REPOSITORY_ONLY = ("ECDiTPipeline.from_pretrained", "ECDiTPipeline.save_pretrained")
_HEADER = ("{what}: generated by train/diffusers_code.py of the EC-DiT repository from its\n{source}.\n\n"
           "Do not edit: export the checkpoint again with `python -m train.export --format diffusers`. Needs torch,\n"
           "diffusers and transformers (numpy and Pillow come with them); diffusers loads it with\n"
           "`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.\n")


def _sources(part: str) -> str:
    if part == "pipeline":
        return "train/diffusers_pipeline.py, train/generate.py, train/visualize.py and model/"
    return "train/diffusers_pipeline.py and model/"


def code_files() -> dict[str, str]:
    """{path in the export folder: source} of the self-contained code files diffusers loads."""
    me = __name__
    return {
        f"{PIPELINE_MODULE}.py": generate([(me, "ECDiTPipeline"), ("model.routing", "LoadMeter")],
                                          drop=set(REPOSITORY_ONLY),
                                          doc=_HEADER.format(what="ECDiTPipeline", source=_sources("pipeline"))),
        f"transformer/{MODELING_MODULE}.py": generate(
            [(me, "ECDiTTransformer2DModel")], drop=set(REPOSITORY_ONLY),
            doc=_HEADER.format(what="ECDiTTransformer2DModel", source=_sources("transformer"))),
    }


def write_code_files(folder) -> None:
    """Write the code files into a saved pipeline folder and point model_index.json at them."""
    folder = Path(folder)
    for rel, code in code_files().items():
        (folder / rel).write_text(code)
    f = folder / "model_index.json"
    index = json.loads(f.read_text())
    index["_class_name"] = [PIPELINE_MODULE, "ECDiTPipeline"]
    index["transformer"] = [MODELING_MODULE, "ECDiTTransformer2DModel"]
    f.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
