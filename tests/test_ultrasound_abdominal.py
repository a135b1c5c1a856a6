"""B-mode simulation of the synthetic ultrasound twins (``nnunet_ext.synthetic.ultrasound_abdominal``): fan
geometry, polygons, speckle statistics and the image model, against hand-computed values."""
import numpy as np

from nnunet_ext.synthetic.ultrasound_abdominal import Fan, bmode, echo_map, organ_polygon, rasterise, speckle

FAN = Fan(apex_x=5.0, apex_y=-5.0, r_min=5.0, r_max=15.0, half_angle=np.deg2rad(40.0))


def test_fan_mask_and_depth_by_hand():
    mask, depth = FAN.mask((12, 11)), FAN.depth((12, 11))
    assert mask[0, 5] and mask[10, 5] and not mask[11, 5]  # radius 5 (probe face), 15 (deepest), 16 (beyond)
    assert mask[1, 0] and not mask[0, 0]  # 39.8 and 45 degrees off the axis
    assert (depth[0, 5], depth[5, 5], depth[10, 5]) == (0.0, 0.5, 1.0)
    outline = rasterise([(FAN.outline(64), 1)], (12, 11)).astype(bool)
    assert (outline & mask).sum() / (outline | mask).sum() > 0.85  # the outline polygon traces the fan


def test_polygon_and_painting_order():
    ellipse = organ_polygon(np.random.default_rng(0), (10.0, 8.0), (6.0, 3.0), num_points=4, ripple=0.0,
                            rotation=0.0)
    assert np.allclose(ellipse, [[16, 8], [10, 11], [4, 8], [10, 5]])
    painted = rasterise([(ellipse, 1), (np.array([[9, 7], [11, 7], [11, 9], [9, 9]]), 2)], (16, 20))
    assert painted[8, 10] == 2 and painted[8, 5] == 1 and painted[0, 0] == 0
    assert (painted == 2).sum() == 9  # a 3 x 3 square, edges included


def test_speckle_is_rayleigh_with_mean_one():
    """Fully developed speckle: the envelope of complex Gaussian scattering, std/mean = sqrt(4/pi - 1) = 0.523."""
    envelope = speckle(np.random.default_rng(1), (256, 256))
    assert abs(envelope.mean() - 1.0) < 1e-9
    assert abs(envelope.std() / envelope.mean() - np.sqrt(4 / np.pi - 1)) < 0.03


def test_bmode_follows_echogenicity_and_depth():
    shape = (64, 64)
    fan = Fan(apex_x=32.0, apex_y=-8.0, r_min=8.0, r_max=72.0, half_angle=np.deg2rad(40.0))
    organ = np.zeros(shape, dtype=bool)
    organ[20:40, 24:40] = True
    image = bmode(np.random.default_rng(2), echo_map(shape, [(organ, 0.6)]), fan)
    inside = fan.mask(shape)
    assert image.dtype == np.uint8 and not image[~inside].any()
    assert image[organ].mean() > image[inside & ~organ].mean() + 25  # 0.6 vs 0.2 echogenicity: +9.5 dB
    uniform = bmode(np.random.default_rng(3), echo_map(shape, []), fan).astype(float)
    shallow, deep = uniform[inside & (fan.depth(shape) < 0.3)], uniform[inside & (fan.depth(shape) > 0.7)]
    assert shallow.mean() > deep.mean() + 5  # attenuation not fully compensated by the time-gain control
