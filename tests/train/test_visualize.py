"""Sample grids and expert-count heatmaps: pixel values and geometry, not just that a PNG appears."""

import numpy as np
import pytest
import torch
from PIL import Image

from train.visualize import (colormap, expert_count_maps, expert_heatmap, expert_heatmap_layers, image_grid,
                             save_png, to_uint8, upscale_factor)


def _images(n, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def test_to_uint8_maps_minus_one_to_zero_and_one_to_255():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    a = to_uint8(x)
    assert a.shape == (1, 1, 4, 3) and a.dtype == np.uint8
    assert a[0, 0, :, 0].tolist() == [0, 128, 255, 255]


def test_image_grid_geometry_and_pixels():
    imgs = _images(5, 8, 8)
    pad, k = 2, 3
    grid = image_grid(imgs, nrow=3, pad=pad, scale=k)
    w = h = 8 * k
    assert grid.size == (pad + 3 * (w + pad), pad + 2 * (h + pad))
    g = np.array(grid)
    u8 = to_uint8(imgs)
    for i in range(5):
        x0, y0 = pad + (i % 3) * (w + pad), pad + (i // 3) * (h + pad)
        tile = g[y0:y0 + h, x0:x0 + w]
        np.testing.assert_array_equal(tile, u8[i].repeat(k, 0).repeat(k, 1))
    # the sixth cell is empty background
    x0, y0 = pad + 2 * (w + pad), pad + (h + pad)
    assert (g[y0:y0 + h, x0:x0 + w] == 255).all()


def test_image_grid_upscales_tiny_images_and_draws_captions():
    imgs = _images(2, 32, 32)
    k = upscale_factor(32)
    assert k >= 3
    plain = image_grid(imgs, nrow=2)
    assert plain.size == (2 + 2 * (32 * k + 2), 2 + 32 * k + 2)
    cap = image_grid(imgs, nrow=2, captions=["a red circle", "two blue squares left of a green triangle"])
    assert cap.width == plain.width and cap.height > plain.height
    below = np.array(cap)[plain.height - 2:]  # caption strip
    assert (below < 128).any(), "caption text is drawn (dark pixels under the images)"
    with pytest.raises(ValueError, match="captions"):
        image_grid(imgs, nrow=2, captions=["only one"])


def test_colormap_is_monotone_from_dark_to_yellow():
    c = colormap(np.arange(5), 4)
    assert tuple(c[0]) == (68, 1, 84) and tuple(c[-1]) == (253, 231, 37)
    lum = c.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(lum) > 0).all()
    assert len({tuple(x) for x in c}) == 5


def test_expert_heatmap_colours_are_the_expert_counts():
    B, grid, E, cell, pad = 2, 4, 4, 5, 2
    g = torch.Generator().manual_seed(0)
    count_T = torch.randint(0, E + 1, (B * grid * grid,), generator=g)
    count_T[0] = E  # image 0, token (0, 0): every expert
    count_T[grid * grid + grid + 1] = 0  # image 1, token (1, 1): none
    maps = expert_count_maps(count_T, B, grid)
    assert maps[0, 0, 0] == E and maps[1, 1, 1] == 0
    img = np.array(expert_heatmap(count_T, B, grid, E, cell=cell, pad=pad))
    side = grid * cell
    colours = colormap(np.arange(E + 1), E)
    for b in range(B):
        for r in range(grid):
            for c in range(grid):
                y = pad + b * (side + pad) + r * cell
                x = pad + c * cell
                block = img[y:y + cell, x:x + cell].reshape(-1, 3)
                assert (block == colours[maps[b, r, c]]).all(), (b, r, c)
    assert tuple(img[pad, pad]) == tuple(colours[E])  # the max colour
    y, x = pad + (side + pad) + cell, pad + cell
    assert tuple(img[y, x]) == tuple(colours[0])  # the min colour
    # the legend (under the rows) shows every level 0..E
    legend = img[pad + B * (side + pad):].reshape(-1, 3)
    present = {tuple(p) for p in legend}
    assert all(tuple(c) in present for c in colours)


def test_expert_heatmap_with_images_puts_the_image_first():
    B, grid, E, cell, pad = 2, 4, 4, 6, 2
    imgs = _images(B, 8, 8)
    count_T = torch.full((B * grid * grid,), E)
    out = np.array(expert_heatmap(count_T, B, grid, E, images=imgs, cell=cell, pad=pad, legend=False))
    side = grid * cell
    assert out.shape[:2] == (pad + B * (side + pad), pad + 2 * (side + pad))
    k = side // 8
    np.testing.assert_array_equal(out[pad:pad + side, pad:pad + side], to_uint8(imgs)[0].repeat(k, 0).repeat(k, 1))
    assert (out[pad:pad + side, 2 * pad + side:2 * pad + 2 * side] == colormap(E, E)).all()


def test_layers_are_columns_in_order():
    B, grid, E, cell, pad = 3, 2, 8, 4, 1
    S = grid * grid
    stats = [{"expert_count": torch.full((B * S,), 1)}, {"expert_count": torch.full((B * S,), 7)}]
    img = expert_heatmap_layers(stats, B, grid, E, cell=cell, pad=pad, layer_names=["block 2", "block 4"],
                                legend=False)
    side = grid * cell
    assert img.width == pad + 2 * (side + pad)
    a = np.array(img)
    c1, c7 = colormap(1, E), colormap(7, E)
    bottom = a[-(side + pad):-pad]  # last image row (header offsets the top, not the bottom)
    assert (bottom[:, pad:pad + side] == c1).all()
    assert (bottom[:, 2 * pad + side:2 * pad + 2 * side] == c7).all()
    with pytest.raises(ValueError, match="expected batch"):
        expert_heatmap(torch.zeros(7), B, grid, E)


def test_save_png_roundtrip(tmp_path):
    img = image_grid(_images(3), nrow=3, scale=1)
    p = save_png(img, tmp_path / "sub" / "g.png")
    np.testing.assert_array_equal(np.array(Image.open(p)), np.array(img))
