"""B-mode ultrasound simulation shared by the synthetic abdominal ultrasound releases.

Used by :mod:`nnunet_ext.synthetic.kidneyus`, :mod:`nnunet_ext.synthetic.ussim` and
:mod:`nnunet_ext.synthetic.liverus`: tiny images (48-96 px a side) that look like curvilinear-probe
B-mode scans and contain an organ a network can learn. It is a simple image-formation model, not a
wave simulation::

    I = log-compress( E * S * exp(-alpha * d) * TGC(d) )   inside the scan fan, 0 outside

* ``E`` echogenicity: mean backscatter per tissue, piecewise constant over the organ masks, times a
  smooth low-frequency texture;
* ``S`` fully developed speckle: the Rayleigh-distributed envelope of complex Gaussian scattering,
  low-pass filtered so that a grain spans one to two pixels (real grains span several pixels of a
  full-size scan);
* ``d`` depth, the distance from the probe's virtual apex normalised to the fan depth, ``alpha`` the
  round-trip attenuation (deep tissue is darker) of which the time-gain compensation ``TGC`` undoes
  a part, as a sonographer would;
* log compression: ``20 log10`` of the envelope, ``FLOOR_DB .. FLOOR_DB + DYNAMIC_RANGE_DB`` mapped to 0..255
  (background tissue, echogenicity 0.2, lands at mid-grey).

Organs are drawn as polygons (ragged ellipses), because two of the three releases store their
annotations as polygons; masks are those polygons rasterised with PIL, in drawing order.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

BACKGROUND_ECHO = 0.2
FLOOR_DB = -30.0
DYNAMIC_RANGE_DB = 36.0
ATTENUATION = 1.6
TGC_FRACTION = 0.6


@dataclass(frozen=True)
class Fan:
    """Sector scanned by a curvilinear probe: apex (may lie above the image), radii and half opening angle."""

    apex_x: float
    apex_y: float
    r_min: float
    r_max: float
    half_angle: float

    def polar(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Radius (px) and angle from the probe axis (rad) of every pixel centre."""
        yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
        dx, dy = xx - self.apex_x, yy - self.apex_y
        return np.hypot(dx, dy), np.arctan2(dx, dy)

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """True inside the scanned sector."""
        radius, angle = self.polar(shape)
        return (radius >= self.r_min) & (radius <= self.r_max) & (np.abs(angle) <= self.half_angle)

    def depth(self, shape: tuple[int, int]) -> np.ndarray:
        """Depth below the probe face, 0 at ``r_min`` and 1 at ``r_max`` (clipped outside)."""
        radius, _ = self.polar(shape)
        return np.clip((radius - self.r_min) / (self.r_max - self.r_min), 0.0, 1.0)

    def outline(self, num_points: int = 16) -> np.ndarray:
        """The sector's boundary as a polygon of ``(x, y)`` points (the liver US ``outline`` annotation)."""
        angles = np.linspace(-self.half_angle, self.half_angle, num_points)
        outer = np.stack([self.apex_x + self.r_max * np.sin(angles), self.apex_y + self.r_max * np.cos(angles)], 1)
        inner = np.stack([self.apex_x + self.r_min * np.sin(angles[::-1]),
                          self.apex_y + self.r_min * np.cos(angles[::-1])], 1)
        return np.concatenate([outer, inner])


def random_fan(rng: np.random.Generator, shape: tuple[int, int]) -> Fan:
    """A sector with its apex above the top centre that fills most of a ``(rows, cols)`` image."""
    rows, cols = shape
    apex_y = -rng.uniform(0.10, 0.25) * rows
    return Fan(apex_x=cols / 2 + rng.uniform(-0.03, 0.03) * cols, apex_y=apex_y,
               r_min=-apex_y + rng.uniform(0.03, 0.08) * rows, r_max=-apex_y + rng.uniform(0.92, 0.98) * rows,
               half_angle=np.deg2rad(rng.uniform(34.0, 42.0)))


def organ_polygon(rng: np.random.Generator, centre: tuple[float, float], radii: tuple[float, float],
                  num_points: int = 24, ripple: float = 0.12, rotation: float | None = None) -> np.ndarray:
    """A ragged ellipse as ``(num_points, 2)`` float ``(x, y)`` points, counter-clockwise.

    The radius is modulated by two low-frequency sinusoids of relative amplitude ``ripple``, so
    every organ has a smooth, irregular boundary.
    """
    t = np.linspace(0.0, 2.0 * np.pi, num_points, endpoint=False)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=2)
    scale = 1.0 + ripple * (0.6 * np.sin(2 * t + phases[0]) + 0.4 * np.sin(3 * t + phases[1]))
    rotation = rng.uniform(-0.5, 0.5) if rotation is None else rotation
    x, y = radii[0] * scale * np.cos(t), radii[1] * scale * np.sin(t)
    cos, sin = np.cos(rotation), np.sin(rotation)
    return np.stack([centre[0] + cos * x - sin * y, centre[1] + sin * x + cos * y], axis=1)


def rasterise(polygons: list[tuple[np.ndarray, int]], shape: tuple[int, int]) -> np.ndarray:
    """Paint ``(points, value)`` polygons in order onto a zero ``(rows, cols)`` uint8 image (later ones on top)."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for points, value in polygons:
        draw.polygon([(float(x), float(y)) for x, y in points], fill=int(value))
    return np.asarray(canvas, dtype=np.uint8).copy()


def speckle(rng: np.random.Generator, shape: tuple[int, int], grain_px: float = 0.7) -> np.ndarray:
    """Correlated Rayleigh speckle with mean 1: ``|h * (n_r + i n_i)|`` for Gaussian ``n``, Gaussian PSF ``h``."""
    real = gaussian_filter(rng.normal(size=shape), grain_px)
    imaginary = gaussian_filter(rng.normal(size=shape), grain_px)
    envelope = np.hypot(real, imaginary)
    return envelope / envelope.mean()


def texture(rng: np.random.Generator, shape: tuple[int, int], strength: float = 0.15) -> np.ndarray:
    """Smooth multiplicative tissue texture around 1 (low-pass filtered noise)."""
    field = gaussian_filter(rng.normal(size=shape), max(shape) / 10)
    return 1.0 + strength * field / (np.abs(field).max() + 1e-12)


def bmode(rng: np.random.Generator, echogenicity: np.ndarray, fan: Fan) -> np.ndarray:
    """Simulated B-mode uint8 image of an echogenicity map (see the module docstring), black outside ``fan``."""
    shape = echogenicity.shape
    depth = fan.depth(shape)
    gain = np.exp(-ATTENUATION * (1.0 - TGC_FRACTION) * depth)
    envelope = echogenicity * texture(rng, shape) * speckle(rng, shape) * gain
    decibel = 20.0 * np.log10(np.maximum(envelope, 1e-6))
    grey = np.clip((decibel - FLOOR_DB) / DYNAMIC_RANGE_DB, 0.0, 1.0) * 255.0
    return np.where(fan.mask(shape), np.round(grey), 0).astype(np.uint8)


def echo_map(shape: tuple[int, int], regions: list[tuple[np.ndarray, float]],
             background: float = BACKGROUND_ECHO) -> np.ndarray:
    """Echogenicity: ``background`` everywhere, then each ``(mask, level)`` painted in order."""
    echo = np.full(shape, background, dtype=np.float64)
    for mask, level in regions:
        echo[mask] = level
    return echo


def as_rgb(grey: np.ndarray) -> np.ndarray:
    """The grey image as 3 identical channels (``(rows, cols, 3)`` uint8), like RGB exports of grey scans."""
    return np.repeat(grey[..., None], 3, axis=2)


def prepare_root(root: Path, overwrite: bool, generated: tuple[str, ...]) -> None:
    """Create ``root``; refuse a non-empty one unless ``overwrite``, which removes only the ``generated`` folders."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass overwrite=True (--overwrite) to replace its "
                                  f"generated folders {', '.join(generated)}")
        for name in generated:
            shutil.rmtree(root / name, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
