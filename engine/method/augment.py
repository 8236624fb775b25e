"""Training augmentation: random affine plus elastic warp (image and masks together, one
resampling) and intensity jitter.

Geometry works in centred pixel coordinates: the origin is the image centre, x grows to the
right, y grows downwards, one unit is one pixel. A forward matrix ``A`` (2, 3) sends an input
point to its output position, ``[x', y'] = A[:, :2] @ [x, y] + A[:, 2]``. Points that leave the
image are lost; areas that enter it are filled with 0 (image and masks).

All randomness comes from the caller's ``torch.Generator`` (CPU), so a seed fixes the result
regardless of the tensors' device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def affine_matrix(rotate_deg: float = 0.0, scale: float = 1.0,
                  translate_px: tuple[float, float] = (0.0, 0.0),
                  shear_deg: float = 0.0) -> torch.Tensor:
    """Forward matrix float64 (2, 3): shear along x, then scale, then rotate, then translate.

    rotate_deg: positive turns +x towards +y (clockwise on screen, since y points down).
    translate_px: (tx, ty) in pixels, +tx right, +ty down.
    """
    t = math.radians(rotate_deg)
    rot = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]],
                       dtype=torch.float64)
    shear = torch.tensor([[1.0, math.tan(math.radians(shear_deg))], [0.0, 1.0]],
                         dtype=torch.float64)
    lin = rot @ (scale * shear)
    trans = torch.tensor(translate_px, dtype=torch.float64).view(2, 1)
    return torch.cat([lin, trans], dim=1)


def _sampling_theta(forward: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Turn forward pixel matrices (N, 2, 3) into affine_grid thetas (output -> input).

    affine_grid uses normalised coordinates u = x / (W/2), v = y / (H/2) (align_corners=False),
    so theta = D^-1 A^-1 D with D = diag(W/2, H/2), and offset -D^-1 A_lin^-1 t.
    """
    lin, trans = forward[:, :, :2], forward[:, :, 2:]
    inv = torch.linalg.inv(lin)
    d = torch.tensor([width / 2.0, height / 2.0], dtype=forward.dtype)
    d_inv = (1.0 / d).view(1, 2, 1)
    theta_lin = d_inv * inv * d.view(1, 1, 2)
    theta_t = -d_inv * (inv @ trans)
    return torch.cat([theta_lin, theta_t], dim=2)


def apply_affine(image: torch.Tensor, masks: torch.Tensor, forward: torch.Tensor,
                 displacement: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp each sample by its forward pixel matrix, after an optional elastic displacement.

    image: float (N, 1, H, W), bilinear resampling.
    masks: float (N, C, H, W) in {0, 1}, bilinear resampling then ``>= 0.5``.
    forward: (N, 2, 3) forward matrices (see module doc) or (2, 3) shared by all samples.
    displacement: optional float (N, H, W, 2) in pixels (x, y), on the output grid: output
        pixel p shows the affine-warped image at p + displacement[p] (:func:`sample_elastic`).
        Composed with the affine into one sampling grid, so the image is resampled once.
    Returns (image, masks) with the input shapes and dtypes.
    """
    if image.ndim != 4 or masks.ndim != 4 or image.shape[0] != masks.shape[0] \
            or image.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"image (N, 1, H, W) and masks (N, C, H, W) must agree; got image "
                         f"{tuple(image.shape)} and masks {tuple(masks.shape)}")
    n, _, h, w = image.shape
    forward = torch.as_tensor(forward, dtype=torch.float64).cpu()
    if forward.shape == (2, 3):
        forward = forward.expand(n, 2, 3)
    if forward.shape != (n, 2, 3):
        raise ValueError(f"forward must be (N, 2, 3)=({n}, 2, 3) or (2, 3), got "
                         f"{tuple(forward.shape)}")
    theta = _sampling_theta(forward, h, w).to(device=image.device, dtype=torch.float32)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    if displacement is not None:
        if displacement.shape != (n, h, w, 2):
            raise ValueError(f"displacement must be (N, H, W, 2)=({n}, {h}, {w}, 2), got "
                             f"{tuple(displacement.shape)}")
        # output pixel p samples the affine's output at q = p + d(p); the affine grid is linear
        # in q, so its sampling point moves by theta_lin @ d, d in normalised units (2d / side)
        d = displacement.to(device=image.device, dtype=torch.float32) \
            / torch.tensor([w / 2.0, h / 2.0], device=image.device)
        grid = grid + torch.einsum("nij,nhwj->nhwi", theta[:, :, :2], d)
    img = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False).to(image.dtype)
    msk = F.grid_sample(masks.float(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return img, (msk >= 0.5).to(masks.dtype)


def sample_affine(n: int, height: int, width: int, generator: torch.Generator,
                  max_rotate_deg: float = 10.0, max_scale: float = 0.1,
                  max_translate: float = 0.05, max_shear_deg: float = 5.0) -> torch.Tensor:
    """Draw N forward matrices float64 (N, 2, 3), each parameter uniform in its range.

    rotation in [-max_rotate_deg, max_rotate_deg], scale in [1 - max_scale, 1 + max_scale],
    translation in [-max_translate, max_translate] x (W, H) pixels, shear in
    [-max_shear_deg, max_shear_deg].
    """
    u = torch.rand((n, 5), generator=generator, dtype=torch.float64) * 2.0 - 1.0
    mats = [
        affine_matrix(rotate_deg=float(r) * max_rotate_deg, scale=1.0 + float(s) * max_scale,
                      translate_px=(float(tx) * max_translate * width,
                                    float(ty) * max_translate * height),
                      shear_deg=float(sh) * max_shear_deg)
        for r, s, tx, ty, sh in u.tolist()
    ]
    return torch.stack(mats) if mats else torch.zeros((0, 2, 3), dtype=torch.float64)


ELASTIC_CONTROL_POINTS = 5  # per side: a smooth, organ-scale warp (about a quarter of the image per bend)


def sample_elastic(n: int, height: int, width: int, generator: torch.Generator,
                   max_displacement: float, control_points: int = ELASTIC_CONTROL_POINTS
                   ) -> torch.Tensor:
    """Draw N smooth random displacement fields, float32 (N, H, W, 2) in pixels (x, y).

    Each component at each of ``control_points`` x ``control_points`` evenly spaced points is
    uniform in [-max_displacement, max_displacement] x (W for x, H for y); the field between
    them is their bicubic interpolation, clamped to the same bound. The corners of the field
    sit on the image's corners.
    """
    if control_points < 2:
        raise ValueError(f"control_points must be >= 2, got {control_points}")
    u = torch.rand((n, 2, control_points, control_points), generator=generator,
                   dtype=torch.float64) * 2.0 - 1.0
    bound = torch.tensor([width, height], dtype=torch.float64).view(1, 2, 1, 1) * max_displacement
    coarse = (u * bound).float()
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
    field = torch.maximum(torch.minimum(field, bound.float()), -bound.float())
    return field.permute(0, 2, 3, 1).contiguous()


def random_affine(image: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
                  max_rotate_deg: float = 10.0, max_scale: float = 0.1,
                  max_translate: float = 0.05, max_shear_deg: float = 5.0,
                  elastic: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One random affine per sample (and, with ``elastic`` > 0, one random elastic warp before
    it), applied identically to its image and masks in one resampling.

    image: float (N, 1, H, W); masks: float (N, C, H, W) in {0, 1}. elastic: the largest
    displacement, a fraction of the image side (:func:`sample_elastic`). Returns the warped
    pair (same shapes and dtypes). Deterministic given ``generator``. With every magnitude 0
    the inputs are returned unchanged (as clones) and the generator is not advanced; with
    ``elastic`` 0 the generator draws exactly what it drew before the elastic warp existed.
    """
    if max_rotate_deg == 0 and max_scale == 0 and max_translate == 0 and max_shear_deg == 0 \
            and elastic == 0:
        return image.clone(), masks.clone()
    if elastic < 0:
        raise ValueError(f"elastic must be >= 0, got {elastic}")
    n, _, h, w = image.shape
    forward = sample_affine(n, h, w, generator, max_rotate_deg, max_scale, max_translate,
                            max_shear_deg)
    disp = sample_elastic(n, h, w, generator, elastic) if elastic > 0 else None
    return apply_affine(image, masks, forward, disp)


def random_intensity(image: torch.Tensor, generator: torch.Generator,
                     gamma: tuple[float, float] = (0.8, 1.25),
                     contrast: float = 0.1) -> torch.Tensor:
    """Per-sample gamma then contrast jitter of images in [0, 1]; masks are unaffected.

    image: float (N, 1, H, W) in [0, 1]. gamma: exponent drawn log-uniformly in
    [gamma[0], gamma[1]]. contrast: factor c uniform in [1 - contrast, 1 + contrast] scaling
    each image about its mean. The result is clamped to [0, 1]; same shape and dtype.
    With gamma=(1, 1) and contrast=0 the output equals the clamped input.
    """
    n = image.shape[0]
    lo, hi = float(gamma[0]), float(gamma[1])
    if not (0 < lo <= hi):
        raise ValueError(f"gamma range must satisfy 0 < low <= high, got {gamma}")
    u = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    g = torch.exp(math.log(lo) + u[:, 0] * (math.log(hi) - math.log(lo)))
    c = 1.0 + (u[:, 1] * 2.0 - 1.0) * contrast
    shape = (n,) + (1,) * (image.ndim - 1)
    g = g.to(device=image.device, dtype=image.dtype).view(shape)
    c = c.to(device=image.device, dtype=image.dtype).view(shape)
    x = image.clamp(0.0, 1.0).pow(g)
    mean = x.mean(dim=tuple(range(1, image.ndim)), keepdim=True)
    return ((x - mean) * c + mean).clamp(0.0, 1.0)
