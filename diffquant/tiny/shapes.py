"""Procedural captioned images: one shape of a named color on a background of another color.

`sample_attributes` draws attributes, `caption` writes the prompt, `render` draws images in torch
(same code on CPU and GPU, so training data is made on the device), and `classify` reads the
attributes back from a generated image by pixel analysis (used by the evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 215, 40),
    "orange": (245, 135, 20),
    "purple": (135, 45, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLORS = list(PALETTE)
SHAPES = ["circle", "square", "triangle"]
POSITIONS = ["center", "left", "right", "top", "bottom"]
SIZES = ["small", "large"]
IMAGE_SIZE = 64

# Object center (x, y) as a fraction of the image side, and radius (half extent) per size.
_CENTERS = {"center": (0.5, 0.5), "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
_RADII = {"small": 0.11, "large": 0.2}


@dataclass(frozen=True)
class Attributes:
    color: str
    shape: str
    background: str
    position: str
    size: str


def caption(a: Attributes) -> str:
    where = "in the center" if a.position == "center" else f"at the {a.position}"
    article = "an" if a.background[0] in "aeiou" else "a"
    return f"a {a.size} {a.color} {a.shape} {where} on {article} {a.background} background"


def sample_attributes(n: int, generator: torch.Generator) -> list[Attributes]:
    """n random attribute sets; the background is always a different color than the shape."""
    def pick(options, k):
        return [options[i] for i in torch.randint(len(options), (k,), generator=generator).tolist()]

    colors, shapes, positions, sizes = pick(COLORS, n), pick(SHAPES, n), pick(POSITIONS, n), pick(SIZES, n)
    offsets = torch.randint(1, len(COLORS), (n,), generator=generator).tolist()
    backgrounds = [COLORS[(COLORS.index(c) + o) % len(COLORS)] for c, o in zip(colors, offsets, strict=True)]
    return [Attributes(*t) for t in zip(colors, shapes, backgrounds, positions, sizes, strict=True)]


def attribute_indices(attrs: list[Attributes], device=None) -> torch.Tensor:
    """[B, 5] long: (color, shape, background, position, size) as indices into COLORS, SHAPES, COLORS,
    POSITIONS, SIZES (the form training samples directly on the device)."""
    rows = [(COLORS.index(a.color), SHAPES.index(a.shape), COLORS.index(a.background), POSITIONS.index(a.position),
             SIZES.index(a.size)) for a in attrs]
    return torch.tensor(rows, dtype=torch.long, device=device).view(-1, 5)


def _masks(idx: torch.Tensor, size: int, jitter: torch.Tensor) -> torch.Tensor:
    """Soft [B, H, W] object masks (anti-aliased over about one pixel) for index rows [B, 5]."""
    device = idx.device
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    y, x = coords.view(1, -1, 1), coords.view(1, 1, -1)
    centers = torch.tensor([_CENTERS[p] for p in POSITIONS], device=device)[idx[:, 3]]  # [B, 2]
    cx = centers[:, 0].view(-1, 1, 1) + jitter[:, 0:1, None]
    cy = centers[:, 1].view(-1, 1, 1) + jitter[:, 1:2, None]
    r = torch.tensor([_RADII[z] for z in SIZES], device=device)[idx[:, 4]].view(-1, 1, 1) * (1 + jitter[:, 2:3, None])
    dx, dy = x - cx, y - cy
    # signed distance (negative inside), in image fractions
    circle = (dx**2 + dy**2).sqrt() - r
    square = torch.maximum(dx.abs(), dy.abs()) - r * 0.886  # same area as the circle
    # upward triangle with the circle's area, centroid at (cx, cy): height 2.2r, base half-width 1.428r
    height, half = 2.2 * r, 1.428 * r
    apex = cy - height * 2 / 3
    slant = (dx.abs() - half * (y - apex) / height) / (1 + (half / height) ** 2) ** 0.5
    triangle = torch.maximum(slant, y - (apex + height))
    kind = idx[:, 1].view(-1, 1, 1)
    sdf = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    return (0.5 - sdf * size).clamp(0, 1)


JITTER = (0.08, 0.08, 0.3)  # full range of the random offsets of (cx, cy) and of the relative radius


def random_jitter(n: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """[n, 3] uniform offsets within +-JITTER/2 (drawn on the generator's device)."""
    u = torch.rand(n, 3, generator=generator, device=generator.device)
    return ((u - 0.5) * torch.tensor(JITTER, device=generator.device)).to(device)


def render_indices(idx: torch.Tensor, size: int = IMAGE_SIZE, jitter: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [B, 3, H, W] in [-1, 1], object masks [B, 1, H, W] in [0, 1]) for index rows [B, 5]
    (see attribute_indices) and optional jitter [B, 3], on idx's device."""
    n, device = idx.shape[0], idx.device
    jitter = torch.zeros(n, 3, device=device) if jitter is None else jitter.to(device)
    mask = _masks(idx, size, jitter).unsqueeze(1)  # [B, 1, H, W]
    palette = torch.tensor([PALETTE[c] for c in COLORS], device=device, dtype=torch.float32)
    fg, bg = palette[idx[:, 0]].view(n, 3, 1, 1), palette[idx[:, 2]].view(n, 3, 1, 1)
    img = bg + (fg - bg) * mask
    return img / 127.5 - 1.0, mask


def render(attrs: list[Attributes], size: int = IMAGE_SIZE, generator: torch.Generator | None = None,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1]. With a generator, positions and sizes jitter slightly."""
    jitter = None if generator is None else random_jitter(len(attrs), generator)
    return render_indices(attribute_indices(attrs, device), size, jitter)[0]


def _nearest_color(rgb: torch.Tensor) -> str:
    table = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32)
    return COLORS[int((table - rgb.view(1, 3)).pow(2).sum(1).argmin())]


def classify(image: torch.Tensor) -> Attributes | None:
    """Read the attributes back from one image [3, H, W] uint8 (or float 0..255) by pixel analysis.

    Background: nearest named color to the median of the border pixels. Object: pixels farther than
    60 (RGB distance) from the background color; its mean color -> nearest named color; shape from
    the fill ratio of its bounding box (square ~1.0, circle ~0.785, triangle ~0.5); position from
    the centroid; size from the area. None when no object region is found.
    """
    img = image.float()
    _, h, w = img.shape
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)  # [3, 2H + 2W]
    bg_rgb = border.median(dim=1).values
    dist = (img - bg_rgb.view(3, 1, 1)).pow(2).sum(0).sqrt()
    mask = dist > 60
    area = int(mask.sum())
    if area < 6:
        return None
    ys, xs = torch.nonzero(mask, as_tuple=True)
    fill = area / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.9 else ("circle" if fill > 0.64 else "triangle")
    cx, cy = xs.float().mean() / w - 0.5, ys.float().mean() / h - 0.5
    if max(abs(cx), abs(cy)) < 0.12:
        position = "center"
    elif abs(cx) >= abs(cy):
        position = "left" if cx < 0 else "right"
    else:
        position = "top" if cy < 0 else "bottom"
    size = "large" if area / (h * w) > 0.075 else "small"
    color = _nearest_color(img[:, mask].mean(dim=1))
    return Attributes(color, shape, _nearest_color(bg_rgb), position, size)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
