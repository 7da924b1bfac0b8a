"""Drawing of PhantomCXR images: schematic frontal chest radiographs built with numpy.

Coordinates: ``u`` runs from -1 (image left) to 1 (image right) and ``v`` from -1 (top)
to 1 (bottom), so one unit is half the image width. The image follows the radiological
convention, so the patient's right side is on the image's left (negative ``u``). Helper
functions take an image-side sign ``sign``: -1 for the patient's right, +1 for the
patient's left.

An image is first composed as a density map in which larger means brighter: air is
about 0, aerated lung about 0.15, soft tissue about 0.55, bone and metal are higher.
``_expose`` then maps it to 8-bit grey values with the study's contrast, gamma,
brightness and noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .phantom import Finding, Patient, Study

MM_PER_UNIT = 190.0
"""Millimetres per coordinate unit, for the sizes and distances that reports quote."""

_SEVERITY_INDEX = {"mild": 0, "moderate": 1, "severe": 2}
_MEDIAL_EDGE = 0.09  # lung medial border, from the midline
_HEART_HALF_HEIGHT = 0.3


def image_sign(laterality: str) -> int:
    """Return -1 for the patient's right (image left) and +1 for the patient's left."""
    return -1 if laterality == "right" else 1


def sides_of(laterality: str) -> tuple[int, ...]:
    """Return the image-side signs covered by a laterality ("bilateral" gives both)."""
    return (-1, 1) if laterality == "bilateral" else (image_sign(laterality),)


def nodule_radius(finding: Finding) -> float:
    """Return the nodule radius in coordinate units: 0.035-0.045 (mild), 0.05-0.065 (moderate)."""
    low, high = ((0.035, 0.045), (0.05, 0.065))[min(_SEVERITY_INDEX.get(finding.severity, 0), 1)]
    return low + (high - low) * finding.extent


def nodule_diameter_mm(finding: Finding) -> int:
    """Return the nodule diameter in millimetres, as the report quotes it."""
    return int(round(2 * nodule_radius(finding) * MM_PER_UNIT))


def tube_tip_cm(finding: Finding) -> int:
    """Return the distance in whole centimetres from the endotracheal tube tip to the carina."""
    return 3 + int(finding.extent * 4)


@dataclass(frozen=True)
class _Chest:
    """Geometry of one study, in coordinate units."""

    shift: float
    lung_scale: float
    apex: float
    dome: dict[int, float]  # image-side sign -> lateral level of that hemidiaphragm
    heart_width: float  # transverse diameter of the heart shadow
    heart_level: float  # height of the heart's centre
    carina: float
    clavicle: float


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    u, v = np.meshgrid(centres, centres)
    u.flags.writeable = False
    v.flags.writeable = False
    return u, v


@lru_cache(maxsize=16)
def _upsampling_matrix(size: int, cells: int) -> np.ndarray:
    """Return the (size, cells) matrix of linear interpolation from a coarse grid."""
    positions = np.linspace(0, cells - 1, size)
    matrix = np.stack([np.interp(positions, np.arange(cells), np.eye(cells)[i]) for i in range(cells)], axis=1)
    matrix = matrix.astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Return (size, size) noise with unit-order amplitude and features size/cells wide."""
    matrix = _upsampling_matrix(size, cells)
    return matrix @ rng.standard_normal((cells, cells), dtype=np.float32) @ matrix.T


def _soft(distance: np.ndarray, width: float) -> np.ndarray:
    """Map a signed distance (positive inside) to an anti-aliased 0-1 mask."""
    return np.clip(distance / width + 0.5, 0.0, 1.0)


def _polyline_distance(u: np.ndarray, v: np.ndarray, points: np.ndarray, reach: float = 0.12) -> np.ndarray:
    """Return the distance of every pixel to the polyline through ``points`` (P, 2).

    Only pixels within ``reach`` of the polyline's bounding box are computed; the rest
    get infinity, which is enough for drawing lines thinner than ``reach``.
    """
    size = u.shape[0]
    low = np.clip(np.floor((points.min(axis=0) - reach + 1.0) / 2.0 * size), 0, size).astype(int)
    high = np.clip(np.ceil((points.max(axis=0) + reach + 1.0) / 2.0 * size), 0, size).astype(int)
    rows, cols = slice(low[1], high[1]), slice(low[0], high[0])
    box_u, box_v = u[rows, cols], v[rows, cols]

    best = np.full(box_u.shape, np.inf, dtype=u.dtype)
    vertices = points.tolist()  # Python floats keep float32 arithmetic in float32
    for (ax, ay), (bx, by) in zip(vertices[:-1], vertices[1:]):
        dx, dy = bx - ax, by - ay
        length2 = max(dx * dx + dy * dy, 1e-12)
        t = np.clip(((box_u - ax) * dx + (box_v - ay) * dy) / length2, 0.0, 1.0)
        best = np.minimum(best, np.hypot(box_u - ax - t * dx, box_v - ay - t * dy))

    distance = np.full(u.shape, np.inf, dtype=u.dtype)
    distance[rows, cols] = best
    return distance


def _bezier(control: list[tuple[float, float]], samples: int = 12) -> np.ndarray:
    """Return (samples, 2) points of the Bezier curve with the given control points."""
    t = np.linspace(0.0, 1.0, samples)[:, None]
    points = np.asarray(control, dtype=float)[None, :, :].repeat(samples, axis=0)
    while points.shape[1] > 1:
        points = (1 - t[:, :, None]) * points[:, :-1] + t[:, :, None] * points[:, 1:]
    return points[:, 0]


def _line(distance: np.ndarray, half_width: float, pixel: float) -> np.ndarray:
    """Return an anti-aliased line mask at least about one pixel wide."""
    return _soft(max(half_width, 0.6 * pixel) - distance, pixel)


# --- geometry -------------------------------------------------------------------------


def _chest_geometry(study: Study) -> _Chest:
    patient = study.patient
    findings = {f.name: f for f in study.findings}
    base = patient.diaphragm_level + study.inspiration
    # The left hemidiaphragm usually sits a little lower than the right.
    dome = {-1: base, 1: base + 0.04}
    if "atelectasis" in findings:
        atelectasis = findings["atelectasis"]
        raise_by = 0.04 + 0.03 * _SEVERITY_INDEX[atelectasis.severity]
        for sign in sides_of(atelectasis.laterality):
            dome[sign] -= raise_by

    heart_ratio = patient.heart_ratio
    if "cardiomegaly" in findings:
        cardiomegaly = findings["cardiomegaly"]
        heart_ratio = 0.55 + 0.06 * _SEVERITY_INDEX[cardiomegaly.severity] + 0.03 * cardiomegaly.extent
    # Cardiothoracic ratio: heart diameter over the inner chest diameter (2 * 0.8 * scale).
    heart_width = heart_ratio * 1.6 * patient.lung_scale

    return _Chest(
        shift=study.shift,
        lung_scale=patient.lung_scale,
        apex=patient.apex_level,
        dome=dome,
        heart_width=heart_width,
        heart_level=base - 0.17,
        carina=patient.apex_level + 0.42,
        clavicle=patient.apex_level + 0.04,
    )


def _lateral_extent(chest: _Chest, v: np.ndarray) -> np.ndarray:
    """Return the distance of the inner chest wall from the midline at each height."""
    return chest.lung_scale * (0.8 - 0.08 * ((v - 0.15) / 0.9) ** 2)


def _across(chest: _Chest, u: np.ndarray, sign: int) -> np.ndarray:
    """Return the position across one hemithorax: 0 at the medial border, 1 at the wall."""
    return (sign * (u - chest.shift) - _MEDIAL_EDGE) / (0.8 * chest.lung_scale - _MEDIAL_EDGE)


def _apex_curve(chest: _Chest, across: np.ndarray) -> np.ndarray:
    return chest.apex + 0.4 * ((across - 0.45) / 0.55) ** 2


def _dome_curve(chest: _Chest, across: np.ndarray, sign: int) -> np.ndarray:
    return chest.dome[sign] - 0.2 * (1.0 - np.abs((across - 0.4) / 0.62) ** 2.2)


def _wall_distances(chest: _Chest, u: np.ndarray, v: np.ndarray, sign: int,
                    heart: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (outer, inner) signed distances to one lung's borders, positive inside.

    ``outer`` uses only the chest wall and apex, where a pneumothorax collects. ``inner``
    uses the mediastinum, the heart and the diaphragm. ``heart`` is the signed distance
    to the heart border, positive inside.
    """
    across = _across(chest, u, sign)
    lateral = _lateral_extent(chest, v) - sign * (u - chest.shift)
    apical = v - _apex_curve(chest, across)
    outer = np.minimum(lateral, apical)

    medial = sign * (u - chest.shift) - _MEDIAL_EDGE
    diaphragm = _dome_curve(chest, across, sign) - v
    inner = np.minimum(np.minimum(medial, diaphragm), -heart)
    if sign == 1:
        # The aortic knob bulges into the upper left lung.
        knob = np.hypot(u - chest.shift - 0.085, v - (chest.carina - 0.1)) - 0.06
        inner = np.minimum(inner, knob)
    return outer, inner


def _heart_distance(chest: _Chest, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Return an approximate signed distance to the heart border, positive inside.

    The shadow is the union of a tilted ventricular ellipse, which reaches 64% of the
    heart's width to the patient's left, and a smaller right atrial ellipse, which
    reaches 36% of it to the patient's right.
    """
    width, level = chest.heart_width, chest.heart_level
    half_height = _HEART_HALF_HEIGHT * (1.0 + 0.8 * max(width - 0.72, 0.0))
    # Ventricles: the apex points down and to the patient's left.
    cos, sin = math.cos(math.radians(-25.0)), math.sin(math.radians(-25.0))
    du, dv = u - (chest.shift + 0.14 * width), v - level
    ru = du * cos - dv * sin
    rv = du * sin + dv * cos
    axes = (0.5 * width, half_height)
    ventricles = (1.0 - np.hypot(ru / axes[0], rv / axes[1])) * min(axes)
    atrium_axes = (0.22 * width, 0.7 * half_height)
    atrium = 1.0 - np.hypot((u - chest.shift + 0.14 * width) / atrium_axes[0], (v - level - 0.04) / atrium_axes[1])
    return np.maximum(ventricles, atrium * min(atrium_axes))


# --- anatomy --------------------------------------------------------------------------


def _body(chest: _Chest, patient: Patient, u: np.ndarray, v: np.ndarray, pixel: float) -> np.ndarray:
    """Return soft-tissue density of the neck, sloping shoulders, chest wall and abdomen."""
    shoulders = np.clip((v + 1.0) / 0.45, 0.0, 1.0)
    shoulders = shoulders * shoulders * (3.0 - 2.0 * shoulders)
    half_width = patient.body_half_width * (0.3 + 0.7 * shoulders)
    offset = np.abs(u - chest.shift)
    mask = _soft(half_width - offset, 3 * pixel)
    thickness = 0.75 + 0.25 * np.sqrt(np.clip(1.0 - (offset / half_width) ** 2, 0.0, 1.0))
    return patient.soft_tissue_density * mask * thickness


def _markings(chest: _Chest, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return vessel-like lung markings that radiate from the hila and fade outwards."""
    size = u.shape[0]
    total = np.zeros_like(u)
    for sign in (-1, 1):
        hilum_u = chest.shift + sign * 0.22
        hilum_v = chest.carina + 0.22
        du, dv = sign * (u - hilum_u), v - hilum_v
        radius = np.hypot(du, dv)
        angle = np.arctan2(dv, du)
        pattern = np.zeros_like(u)
        for frequency in (9, 14, 23):
            phase, bend = rng.uniform(0, 2 * np.pi), rng.uniform(-4, 4)
            pattern += np.cos(frequency * angle + bend * radius + phase)
        vessels = np.clip(pattern / 3.0, 0.0, 1.0) ** 2
        near = np.exp(-(radius / 0.1) ** 2)
        total += (0.16 * vessels * np.exp(-radius / 0.4) * (1.0 - near) + 0.12 * near) * (du > -0.1)
    mottle = _smooth_noise(rng, size, max(8, size // 6))
    return total + 0.012 * mottle


def _ribs(chest: _Chest, patient: Patient, u: np.ndarray, v: np.ndarray, pixel: float) -> np.ndarray:
    """Return density of posterior ribs (clear arcs) and anterior ribs (faint, sloping).

    Ribs are evenly spaced copies of one curve, so each family is drawn with a single
    periodic profile instead of one band per rib.
    """
    count = 10
    spacing = (patient.diaphragm_level + 0.22 - chest.apex) / count
    first = chest.apex - 0.02
    half_width = max(0.024, 0.8 * pixel) / spacing
    density = np.zeros_like(u)
    for sign in (-1, 1):
        across = (sign * (u - chest.shift) - 0.07) / (0.85 * chest.lung_scale)
        inside = _soft(np.minimum(across, 1.06 - across) * 0.8, pixel)
        posterior = _rib_profile((v - first + 0.25 * across - 0.5 * across**2) / spacing, count, half_width)
        anterior = _rib_profile((v - first - 0.12 - 0.3 * (1.0 - across)) / spacing, count, half_width)
        anterior_fade = np.clip((across - 0.3) / 0.3, 0.0, 1.0)
        density += inside * (0.065 * posterior + 0.03 * anterior_fade * anterior)
    return density


def _rib_profile(position: np.ndarray, count: int, half_width: float) -> np.ndarray:
    """Return 0-1 bands at integer ``position`` values 0 to count-1 (position in rib spacings)."""
    offset = np.abs(position - np.round(position))
    bands = np.sqrt(np.clip(1.0 - offset / half_width, 0.0, 1.0))
    return bands * ((position > -0.5) & (position < count - 0.5))


def _clavicles(chest: _Chest, u: np.ndarray, v: np.ndarray, pixel: float) -> np.ndarray:
    density = np.zeros_like(u)
    for sign in (-1, 1):
        control = [(chest.shift + sign * 0.07, chest.clavicle + 0.1),
                   (chest.shift + sign * 0.35, chest.clavicle + 0.06),
                   (chest.shift + sign * 0.72, chest.clavicle - 0.02)]
        distance = _polyline_distance(u, v, _bezier(control, 8))
        density += 0.13 * _line(distance, 0.03, pixel)
    return density


def _spine(chest: _Chest, u: np.ndarray, v: np.ndarray, pixel: float) -> np.ndarray:
    """Return density of the vertebral column with darker disc spaces."""
    column = _soft(0.075 - np.abs(u - chest.shift), 2 * pixel)
    discs = np.cos(2 * np.pi * (v - chest.apex) / 0.125)
    return column * (0.08 - 0.03 * np.clip(discs - 0.6, 0.0, 1.0) / 0.4) * _soft(v + 0.95, pixel)


def _airways(chest: _Chest, u: np.ndarray, v: np.ndarray, pixel: float) -> np.ndarray:
    """Return the (negative) density of the tracheal air column and main bronchi."""
    top = np.array([[chest.shift, -1.05], [chest.shift, chest.carina]])
    trachea = _line(_polyline_distance(u, v, top), 0.032, pixel)
    bronchi = np.zeros_like(u)
    for sign, drop in ((-1, 0.1), (1, 0.16)):
        points = np.array([[chest.shift, chest.carina], [chest.shift + sign * 0.16, chest.carina + drop]])
        bronchi = np.maximum(bronchi, _line(_polyline_distance(u, v, points), 0.022, pixel))
    return -0.12 * np.maximum(trachea, bronchi)


def _gastric_bubble(chest: _Chest, u: np.ndarray, v: np.ndarray, pixel: float) -> np.ndarray:
    centre_u, centre_v = chest.shift + 0.33 * chest.lung_scale, chest.dome[1] + 0.09
    ellipse = 1.0 - np.hypot((u - centre_u) / 0.11, (v - centre_v) / 0.06)
    # Air above a flat air-fluid level.
    return -0.22 * _soft(ellipse * 0.06, pixel) * _soft(centre_v + 0.01 - v, pixel)


# --- findings -------------------------------------------------------------------------


def _effusion(chest: _Chest, finding: Finding, u: np.ndarray, v: np.ndarray, sign: int) -> np.ndarray:
    """Return basal opacity (0-1) with a meniscus that climbs the lateral chest wall."""
    height = (0.12, 0.3, 0.5)[_SEVERITY_INDEX[finding.severity]] + 0.1 * finding.extent
    across = np.clip(_across(chest, u, sign), 0.0, 1.0)
    level = chest.dome[sign] - height + 0.14 * (1.0 - across) ** 1.5
    return 0.5 + 0.5 * np.tanh((v - level) / 0.036)


def _pneumothorax(chest: _Chest, finding: Finding, outer: np.ndarray, v: np.ndarray, sign: int,
                  pixel: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (lucent rim mask, pleural line mask) along the apex and lateral wall."""
    gap = (0.07, 0.13, 0.22)[_SEVERITY_INDEX[finding.severity]] + 0.06 * finding.extent
    height = (v - chest.apex) / (chest.dome[sign] - chest.apex)
    gap = gap * np.clip(1.15 - 0.85 * height, 0.25, 1.0)
    rim = _soft(gap - outer, pixel)
    line = _line(np.abs(outer - gap), 0.004, pixel)
    return rim, line


def _zone_rows(chest: _Chest, zone: str, sign: int) -> tuple[float, float]:
    """Return the (top, bottom) heights of an upper, middle or lower lung zone."""
    top, bottom = chest.apex + 0.08, chest.dome[sign] - 0.12
    third = (bottom - top) / 3
    index = ("upper", "middle", "lower").index(zone)
    return top + index * third, top + (index + 1) * third


def _consolidation(chest: _Chest, finding: Finding, walls: tuple[np.ndarray, np.ndarray], u: np.ndarray,
                   v: np.ndarray, rng: np.random.Generator, pixel: float) -> np.ndarray:
    """Return a patchy airspace opacity (0-1) centred on aerated lung in the finding's zone."""
    scale = (0.8, 1.1, 1.4)[_SEVERITY_INDEX[finding.severity]] * (1.0 + 0.2 * finding.extent)
    centre_u, centre_v = _pick_point(chest, finding, walls, u, v, 0.06, rng, pixel)
    radius = np.hypot((u - centre_u) / (0.15 * scale), (v - centre_v) / (0.12 * scale))
    # Smooth noise both warps the outline and makes the inside patchy.
    radius = radius * np.clip(1.0 + 0.25 * _smooth_noise(rng, u.shape[0], 10), 0.5, 1.5)
    patches = 0.8 + 0.3 * _smooth_noise(rng, u.shape[0], 20)
    return np.clip(1.6 * np.exp(-radius**2.5) * patches - 0.3, 0.0, 1.0)


def _pick_point(chest: _Chest, finding: Finding, walls: tuple[np.ndarray, np.ndarray], u: np.ndarray,
                v: np.ndarray, margin: float, rng: np.random.Generator, pixel: float) -> tuple[float, float]:
    """Return a random point of the finding's lung zone, ``margin`` inside the lung if possible.

    Small images can leave no pixel that far inside, so the margin is dropped before
    falling back to the centre of the zone.
    """
    sign = image_sign(finding.laterality)
    top, bottom = _zone_rows(chest, finding.zone, sign)
    outer, inner = walls
    depth = np.minimum(inner, outer)
    in_zone = (v >= top) & (v <= bottom)
    for required in (margin + pixel, 0.0):
        candidates = np.flatnonzero(in_zone & (depth > required))
        if candidates.size:
            chosen = candidates[rng.integers(candidates.size)]
            return float(u.flat[chosen]), float(v.flat[chosen])
    return chest.shift + sign * 0.45 * chest.lung_scale, (top + bottom) / 2


def _nodule(chest: _Chest, finding: Finding, walls: tuple[np.ndarray, np.ndarray], u: np.ndarray,
            v: np.ndarray, rng: np.random.Generator, pixel: float) -> np.ndarray:
    """Return a round dense spot placed at random inside the finding's lung zone."""
    radius = nodule_radius(finding)
    centre_u, centre_v = _pick_point(chest, finding, walls, u, v, radius, rng, pixel)
    return _soft(radius - np.hypot(u - centre_u, v - centre_v), pixel)


def _atelectasis(chest: _Chest, finding: Finding, u: np.ndarray, v: np.ndarray, sign: int,
                 pixel: float) -> np.ndarray:
    """Return one or two plate-like linear opacities above the (raised) hemidiaphragm."""
    severity = _SEVERITY_INDEX[finding.severity]
    half_width = (0.018, 0.024, 0.03)[severity]
    opacity = np.zeros_like(u)
    for band in range(1 + (severity == 2)):
        level = chest.dome[sign] - 0.24 - 0.05 * finding.extent - 0.09 * band
        points = np.array([[chest.shift + sign * 0.2, level + 0.03], [chest.shift + sign * 0.62, level - 0.03]])
        opacity = np.maximum(opacity, _line(_polyline_distance(u, v, points), half_width, 3 * pixel))
    return opacity


def _device(chest: _Chest, finding: Finding, u: np.ndarray, v: np.ndarray, pixel: float) -> np.ndarray:
    """Return the density of one radiopaque support device."""
    sign = image_sign(finding.laterality)
    svc_u = chest.shift - 0.05
    if finding.device == "endotracheal_tube":
        tip = chest.carina - tube_tip_cm(finding) * 10.0 / MM_PER_UNIT
        tube = _polyline_distance(u, v, np.array([[chest.shift, -1.05], [chest.shift, tip]]))
        stripe = _polyline_distance(u, v, np.array([[chest.shift + 0.008, -1.05], [chest.shift + 0.008, tip]]))
        # Faint plastic walls and the bright radiopaque stripe along the tube.
        return 0.15 * _line(np.abs(tube - 0.016), 0.004, pixel) + 0.5 * _line(stripe, 0.006, pixel)
    if finding.device == "enteric_tube":
        control = [(chest.shift + 0.01, -1.05), (chest.shift + 0.03, 0.2),
                   (chest.shift + 0.25, chest.dome[1] + 0.05), (chest.shift + 0.36, chest.dome[1] + 0.16)]
        return 0.35 * _line(_polyline_distance(u, v, _bezier(control, 16)), 0.008, pixel)
    if finding.device == "jugular_catheter":
        control = [(chest.shift + sign * 0.17, -1.05), (chest.shift + sign * 0.12, -0.7),
                   (svc_u, chest.carina - 0.2), (svc_u, chest.carina + 0.06)]
        return 0.4 * _line(_polyline_distance(u, v, _bezier(control)), 0.006, pixel)
    if finding.device == "subclavian_catheter":
        control = [(chest.shift + sign * 0.62, chest.clavicle + 0.03), (chest.shift + sign * 0.2, chest.clavicle + 0.08),
                   (svc_u, chest.carina - 0.15), (svc_u, chest.carina + 0.06)]
        return 0.4 * _line(_polyline_distance(u, v, _bezier(control)), 0.006, pixel)
    if finding.device == "pacemaker":
        return _pacemaker(chest, u, v, sign, pixel)
    raise ValueError(f"unknown support device {finding.device!r}")


def _pacemaker(chest: _Chest, u: np.ndarray, v: np.ndarray, sign: int, pixel: float) -> np.ndarray:
    box_u, box_v = chest.shift + sign * 0.5, chest.clavicle + 0.17
    # Rounded rectangle: distance to an inner rectangle, minus the corner radius.
    du = np.maximum(np.abs(u - box_u) - 0.06, 0.0)
    dv = np.maximum(np.abs(v - box_v) - 0.035, 0.0)
    box = _soft(0.028 - np.hypot(du, dv), pixel)

    width, level = chest.heart_width, chest.heart_level
    leads = np.zeros_like(u)
    targets = [(chest.shift - 0.12 * width, level - 0.12),  # right atrium
               (chest.shift + 0.3 * width, level + 0.15)]  # right ventricle apex
    for target in targets:
        control = [(box_u - sign * 0.05, box_v), (chest.shift + sign * 0.15, chest.clavicle + 0.1),
                   (chest.shift - 0.05, chest.carina + 0.05), target]
        leads = np.maximum(leads, _line(_polyline_distance(u, v, _bezier(control)), 0.006, pixel))
    return 0.95 * box + 0.4 * leads


# --- composition ----------------------------------------------------------------------


def draw_study(study: Study, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the radiograph of ``study``.

    Args:
        study: the study, with its patient traits and findings.
        size: image side in pixels.
        rng: the study's generator; drawing consumes a fixed sequence of its numbers.

    Returns:
        (size, size) uint8 array, 0 black (air) to 255 white (metal).
    """
    u, v = _grid(size)
    pixel = 2.0 / size
    chest = _chest_geometry(study)
    findings = {f.name: f for f in study.findings}

    density = _body(chest, study.patient, u, v, pixel)
    markings = _markings(chest, u, v, rng)
    lungs = np.zeros_like(u)
    walls = {}
    heart = _heart_distance(chest, u, v)
    for sign in (-1, 1):
        walls[sign] = _wall_distances(chest, u, v, sign, heart)
        lung, lung_density = _lung(chest, study.patient, findings, u, v, sign, walls[sign], markings, rng, pixel)
        density = density * (1 - lung) + lung_density * lung
        lungs += lung

    # Bones show more clearly against aerated lung than against soft tissue.
    density += _ribs(chest, study.patient, u, v, pixel) * (0.5 + 0.5 * lungs)
    density += _clavicles(chest, u, v, pixel) + _spine(chest, u, v, pixel)
    density += _airways(chest, u, v, pixel) + _gastric_bubble(chest, u, v, pixel)
    if "nodule" in findings:
        nodule = findings["nodule"]
        density += 0.5 * _nodule(chest, nodule, walls[image_sign(nodule.laterality)], u, v, rng, pixel)
    if "support_device" in findings:
        density += _device(chest, findings["support_device"], u, v, pixel)
    return _expose(density, study, rng)


def _lung(chest: _Chest, patient: Patient, findings: dict, u: np.ndarray, v: np.ndarray, sign: int,
          walls: tuple[np.ndarray, np.ndarray], markings: np.ndarray, rng: np.random.Generator,
          pixel: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (mask, density) of one lung with its markings and findings."""
    outer, inner = walls
    lung = _soft(np.minimum(outer, inner), 2.5 * pixel)
    # Overlapping soft tissue makes the bases a little brighter than the apices.
    height = np.clip((v - chest.apex) / (chest.dome[sign] - chest.apex), 0.0, 1.0)
    density = patient.lung_density + 0.05 * height + markings

    pneumothorax = findings.get("pneumothorax")
    if pneumothorax is not None and sign == image_sign(pneumothorax.laterality):
        rim, pleural_line = _pneumothorax(chest, pneumothorax, outer, v, sign, pixel)
        collapsed = 0.02 * (1 + _SEVERITY_INDEX[pneumothorax.severity])
        density = (density + collapsed) * (1 - rim) + (patient.lung_density - 0.08) * rim
        density = density + 0.22 * pleural_line * lung

    opacity = _lung_opacity(chest, findings, u, v, sign, walls, rng, pixel)
    return lung, density + opacity * (patient.soft_tissue_density - density)


def _lung_opacity(chest: _Chest, findings: dict, u: np.ndarray, v: np.ndarray, sign: int,
                  walls: tuple[np.ndarray, np.ndarray], rng: np.random.Generator, pixel: float) -> np.ndarray:
    """Return how far (0-1) each pixel of one lung is filled towards soft-tissue density."""
    opacity = np.zeros_like(u)
    effusion = findings.get("pleural_effusion")
    if effusion is not None and sign in sides_of(effusion.laterality):
        opacity = np.maximum(opacity, 0.92 * _effusion(chest, effusion, u, v, sign))
    consolidation = findings.get("consolidation")
    if consolidation is not None and sign == image_sign(consolidation.laterality):
        opacity = np.maximum(opacity, 0.85 * _consolidation(chest, consolidation, walls, u, v, rng, pixel))
    atelectasis = findings.get("atelectasis")
    if atelectasis is not None and sign in sides_of(atelectasis.laterality):
        opacity = np.maximum(opacity, 0.7 * _atelectasis(chest, atelectasis, u, v, sign, pixel))
    return opacity


def _expose(density: np.ndarray, study: Study, rng: np.random.Generator) -> np.ndarray:
    """Map density to 8-bit grey values with the study's exposure and noise."""
    patient = study.patient
    size = density.shape[0]
    image = np.clip(density * patient.exposure_contrast + study.brightness, 0.0, 1.0) ** patient.exposure_gamma
    image = image + study.noise_sigma * rng.standard_normal(density.shape, dtype=np.float32)
    image = image + 0.01 * _smooth_noise(rng, size, 6)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
