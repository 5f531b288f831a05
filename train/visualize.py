"""Pictures of samples and of expert-choice routing (PIL + NumPy only).

    image_grid(images_NCHW, nrow=4, captions=prompts)            # a sample grid (upscaled if tiny)
    expert_heatmap(stats["expert_count"], batch, grid, E)        # EC-DiT Fig. 6: experts per token
    expert_heatmap_layers(out.moe_stats, batch, grid, E, images) # the same, one column per MoE layer
    save_png(img, "grid.png")

Images are float tensors [N, 3, H, W] in [-1, 1] (what the VAEs decode to).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
MIN_CELL_PX = 96  # images smaller than this are upscaled by an integer factor (nearest neighbour)
# Viridis at 0, 1/8, ..., 1 (matplotlib's values, rounded): perceptually uniform, dark = few experts.
_VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
                     (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float64)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def to_uint8(images_NCHW: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 array [N, H, W, 3]."""
    if images_NCHW.dim() != 4 or images_NCHW.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 3, H, W] (or [N, 1, H, W]), got {tuple(images_NCHW.shape)}")
    x = ((images_NCHW.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def upscale_factor(size: int, min_px: int = MIN_CELL_PX) -> int:
    """Integer factor that makes a `size`-pixel image at least `min_px` pixels wide."""
    return max(1, math.ceil(min_px / max(1, size)))


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width_px: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width_px`; the last line is cut with '...' when the text does not fit."""
    char_w = max(1, _text_size(draw, "abcdefghij", font)[0] // 10)
    lines = textwrap.wrap(text, width=max(1, width_px // char_w)) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines


def image_grid(images_NCHW: torch.Tensor, nrow: int = 8, pad: int = 2, captions: Sequence[str] | None = None,
               scale: int | None = None, max_caption_lines: int = 3) -> Image.Image:
    """Images in rows of `nrow`, `pad` pixels apart (and around), optionally a caption under each.

    Tiny images (e.g. 32x32) are upscaled by an integer factor (`scale`, default: enough for
    MIN_CELL_PX pixels) so the grid is legible. Image i sits at x = pad + (i % nrow) * (W' + pad),
    y = pad + (i // nrow) * (H' + caption_h + pad), W' = scale * W.
    """
    arr_NHW3 = to_uint8(images_NCHW)
    N, H, W, _ = arr_NHW3.shape
    if N == 0:
        raise ValueError("image_grid: no images")
    if nrow < 1:
        raise ValueError(f"image_grid: nrow={nrow} must be >= 1")
    if captions is not None and len(captions) != N:
        raise ValueError(f"image_grid: {len(captions)} captions for {N} images")
    k = scale or upscale_factor(max(H, W))
    h, w = H * k, W * k
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped, line_h = None, 0
    if captions is not None:
        wrapped = [_wrap(probe, c, font, w, max_caption_lines) for c in captions]
        line_h = _text_size(probe, "Ag", font)[1] + 2
    cap_h = 0 if wrapped is None else max(len(ls) for ls in wrapped) * line_h + 2
    cols, rows = min(nrow, N), math.ceil(N / nrow)
    grid = Image.new("RGB", (pad + cols * (w + pad), pad + rows * (h + cap_h + pad)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i in range(N):
        x = pad + (i % nrow) * (w + pad)
        y = pad + (i // nrow) * (h + cap_h + pad)
        tile = Image.fromarray(arr_NHW3[i])
        grid.paste(tile.resize((w, h), Image.NEAREST) if k > 1 else tile, (x, y))
        if wrapped is not None:
            for j, line in enumerate(wrapped[i]):
                draw.text((x, y + h + 1 + j * line_h), line, fill=TEXT_COLOR, font=font)
    return grid


# ---- expert-choice heatmaps ---------------------------------------------------------------------

def colormap(values: np.ndarray | torch.Tensor, vmax: float) -> np.ndarray:
    """Viridis colours (uint8 [..., 3]) of `values` scaled from [0, vmax] to [0, 1] (clipped)."""
    v = np.asarray(values, dtype=np.float64) / max(float(vmax), 1e-12)
    pos = np.clip(v, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    return np.rint(rgb).astype(np.uint8)


def expert_count_maps(expert_count_T: torch.Tensor, batch: int, grid: int) -> np.ndarray:
    """Flattened batch-major counts [B*S] -> int array [B, grid, grid] (row-major token order)."""
    counts = torch.as_tensor(expert_count_T).detach().cpu().reshape(-1)
    if counts.numel() != batch * grid * grid:
        raise ValueError(f"expert_count has {counts.numel()} tokens, expected batch={batch} x grid={grid}^2 "
                         f"= {batch * grid * grid}")
    return counts.view(batch, grid, grid).long().numpy()


def _legend(num_experts: int, swatch: int, font) -> Image.Image:
    """A row of E+1 colour swatches 0 .. E ('experts per token'); every level is labelled up to 16
    experts, else a thin bar labelled at 0, E/2 and E."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title = "experts per token:"
    tw, th = _text_size(probe, title, font)
    few = num_experts <= 16
    step = max(_text_size(probe, str(num_experts), font)[0] + 4, swatch) + 2 if few else 3
    labels = set(range(num_experts + 1)) if few else {0, num_experts // 2, num_experts}
    last_w = _text_size(probe, str(num_experts), font)[0]
    img = Image.new("RGB", (tw + 6 + num_experts * step + max(swatch, last_w) + 2, swatch + th + 4), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((0, 0), title, fill=TEXT_COLOR, font=font)
    colors = colormap(np.arange(num_experts + 1), num_experts)
    for v in range(num_experts + 1):
        x = tw + 6 + v * step
        draw.rectangle((x, 0, x + (swatch if few else step) - 1, swatch - 1), fill=tuple(int(c) for c in colors[v]))
        if v in labels:
            draw.text((x, swatch + 2), str(v), fill=TEXT_COLOR, font=font)
    return img


def expert_heatmap_layers(layer_counts: Sequence[torch.Tensor | dict], batch: int, grid: int, num_experts: int,
                          images: torch.Tensor | None = None, cell: int | None = None, pad: int = 2,
                          layer_names: Sequence[str] | None = None, legend: bool = True) -> Image.Image:
    """EC-DiT Fig. 6 for several MoE layers: one row per image, columns [image] + one heatmap per layer.

    `layer_counts`: per layer the expert_count [B*S] tensor or the whole moe_stats dict of that layer.
    Each token is a `cell` x `cell` square (default: enough for a MIN_CELL_PX-wide map, at least the image's pixels per token) coloured by
    how many experts processed it, 0 (dark) .. num_experts (yellow). Headers name the columns when
    `layer_names` is given; a legend goes under the rows.
    """
    counts_L = [expert_count_maps(c["expert_count"] if isinstance(c, dict) else c, batch, grid)
                for c in layer_counts]
    if not counts_L:
        raise ValueError("expert_heatmap: no layers (a dense model has no moe_stats)")
    if layer_names is not None and len(layer_names) != len(counts_L):
        raise ValueError(f"expert_heatmap: {len(layer_names)} layer names for {len(counts_L)} layers")
    imgs = None
    if images is not None:
        imgs = to_uint8(images)
        if imgs.shape[0] != batch:
            raise ValueError(f"expert_heatmap: {imgs.shape[0]} images for batch={batch}")
    if cell is None:
        cell = max(8, math.ceil(MIN_CELL_PX / grid), 0 if imgs is None else imgs.shape[1] // grid)
    side = grid * cell  # heatmap (and image) side in pixels
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header_h = 0 if layer_names is None else _text_size(probe, "Ag", font)[1] + 4
    n_cols = len(counts_L) + (imgs is not None)
    width = pad + n_cols * (side + pad)
    height = pad + header_h + batch * (side + pad)
    leg = _legend(num_experts, max(12, min(cell, 16)), font) if legend else None
    if leg is not None:
        width = max(width, leg.width + 2 * pad)
        height += leg.height + pad
    out = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(out)
    x0 = pad
    if imgs is not None:
        if layer_names is not None:
            draw.text((x0, pad), "image", fill=TEXT_COLOR, font=font)
        for b in range(batch):
            tile = Image.fromarray(imgs[b]).resize((side, side), Image.NEAREST)
            out.paste(tile, (x0, pad + header_h + b * (side + pad)))
        x0 += side + pad
    for li, counts_Bgg in enumerate(counts_L):
        if layer_names is not None:
            draw.text((x0, pad), layer_names[li], fill=TEXT_COLOR, font=font)
        rgb_Bgg3 = colormap(counts_Bgg, num_experts)
        for b in range(batch):
            tile = np.repeat(np.repeat(rgb_Bgg3[b], cell, axis=0), cell, axis=1)  # [side, side, 3]
            out.paste(Image.fromarray(tile), (x0, pad + header_h + b * (side + pad)))
        x0 += side + pad
    if leg is not None:
        out.paste(leg, (pad, pad + header_h + batch * (side + pad)))
    return out


def expert_heatmap(expert_count_T: torch.Tensor, batch: int, grid: int, num_experts: int,
                   images: torch.Tensor | None = None, cell: int | None = None, pad: int = 2,
                   legend: bool = True) -> Image.Image:
    """One MoE layer's Fig. 6: per image (one row each) the number of experts that processed each
    latent token, as a colour-mapped grid x grid map, next to the image when `images` is given.

    Layout (no header): the map of image b starts at x = pad (+ side + pad with images),
    y = pad + b * (side + pad), side = grid * cell; token (r, c) covers cell x cell pixels there.
    """
    return expert_heatmap_layers([expert_count_T], batch, grid, num_experts, images, cell, pad, None, legend)


def moe_layer_names(num_layers: int, moe_every: int = 2) -> list[str]:
    """Column headers for the MoE layers of a model: 'block 2', 'block 4', ... (1-based block index)."""
    return [f"block {moe_every * (i + 1)}" for i in range(num_layers)]


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Write `img` as PNG (creating parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


__all__ = ["image_grid", "expert_heatmap", "expert_heatmap_layers", "expert_count_maps", "colormap",
           "moe_layer_names", "save_png", "to_uint8", "upscale_factor"]
