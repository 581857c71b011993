"""Drawing one synthetic street scene with CamVid's classes (the ``synthetic`` dataset's pictures).

A scene is drawn back to front from one ``numpy.random.Generator``: sky, buildings, the ground
(pavements and the road in perspective), a fence, then objects far to near (trees, poles with
signs, cars, pedestrians, cyclists, void clutter), then the camera (blur, lighting, colour cast,
noise). Every draw comes from the scene's generator in a fixed order, so a seed gives the same
pixels on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.data.readers.base import IGNORE_INDEX

SKY, BUILDING, POLE, ROAD, PAVEMENT, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST = range(11)
Colour = tuple[int, int, int]
Box = tuple[float, float, float, float]


def jitter(rng: np.random.Generator, colour: Colour, spread: int) -> Colour:
    r, g, b = (int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in colour)
    return r, g, b


class Canvas:
    """Draws each shape into the image and its class into the label at once."""

    def __init__(self, width: int, height: int) -> None:
        self.image = Image.new("RGB", (width, height))
        self.label = Image.new("L", (width, height), IGNORE_INDEX)
        self.draw = ImageDraw.Draw(self.image)
        self.mask = ImageDraw.Draw(self.label)

    def polygon(self, points: list[tuple[float, float]], colour: Colour, cls: int) -> None:
        self.draw.polygon(points, fill=colour)
        self.mask.polygon(points, fill=cls)

    def rect(self, box: Box, colour: Colour, cls: int) -> None:
        x0, y0, x1, y1 = box
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        self.draw.rectangle(box, fill=colour)
        self.mask.rectangle(box, fill=cls)

    def ellipse(self, box: Box, colour: Colour, cls: int) -> None:
        self.draw.ellipse(box, fill=colour)
        self.mask.ellipse(box, fill=cls)

    def paint(self, box: Box, colour: Colour) -> None:
        """Texture: colour only, the label keeps the class below."""
        self.draw.rectangle(box, fill=colour)


@dataclass
class Scene:
    """The canvas and the layout every later layer draws against."""

    rng: np.random.Generator
    canvas: Canvas
    w: int
    h: int
    horizon: float
    vx: float  # x of the vanishing point
    half_near: float = 0.0  # half the road's width at the bottom edge

    def road_edge(self, y: float, side: int) -> float:
        t = (y - self.horizon) / (self.h - self.horizon)
        return self.vx + side * (2 + (self.half_near - 2) * t)


def draw_sky(s: Scene) -> None:
    """A vertical gradient between two random blues/greys."""
    top = np.array(jitter(s.rng, (90, 140, 210), 40))
    bottom = np.array(jitter(s.rng, (200, 210, 225), 30))
    for row in range(int(s.horizon) + 1):
        t = row / max(s.horizon, 1)
        red, green, blue = (int(v) for v in top * (1 - t) + bottom * t)
        s.canvas.rect((0, row, s.w, row), (red, green, blue), SKY)


def draw_buildings(s: Scene) -> None:
    """Buildings along the horizon, with window grids."""
    rng, c = s.rng, s.canvas
    x = -rng.uniform(0, 20)
    while x < s.w:
        bw = s.w * rng.uniform(0.12, 0.3)
        top_y = s.h * rng.uniform(0.03, 0.25)
        colour = jitter(rng, (rng.choice([120, 150, 110]), 100, 90), 35)
        c.rect((x, top_y, x + bw, s.horizon + s.h * 0.05), colour, BUILDING)
        dark = rng.random() < 0.7
        win = jitter(rng, (50, 60, 80), 25) if dark else jitter(rng, (200, 200, 150), 30)
        step_x, step_y = rng.uniform(6, 12), rng.uniform(7, 13)
        wy = top_y + 4
        while wy + 4 < s.horizon:
            wx = x + 3
            while wx + 4 < x + bw - 2:
                c.paint((wx, wy, wx + step_x * 0.5, wy + step_y * 0.5), win)
                wx += step_x
            wy += step_y
        x += bw + rng.uniform(-4, 6)


def draw_ground(s: Scene) -> None:
    """Pavements below the buildings, then the road in perspective with a dashed centre line."""
    rng, c, h, horizon, vx = s.rng, s.canvas, s.h, s.horizon, s.vx
    pave = jitter(rng, (150, 140, 130), 30)
    c.rect((0, horizon, s.w, h), pave, PAVEMENT)
    for gy in np.arange(horizon + 4, h, rng.uniform(5, 9)):  # paving joints
        c.draw.line((0, gy, s.w, gy), fill=jitter(rng, pave, 25), width=1)
    s.half_near = s.w * rng.uniform(0.3, 0.45)
    road = jitter(rng, (85, 85, 90), 25)
    near = s.half_near
    c.polygon([(vx - 2, horizon), (vx + 2, horizon), (vx + near, h), (vx - near, h)], road, ROAD)
    for t0 in np.arange(0.05, 1.0, 0.12):
        t1 = min(t0 + 0.06, 1.0)
        y0, y1 = horizon + (h - horizon) * t0, horizon + (h - horizon) * t1
        dash = [
            (vx - 0.3 - 2 * t0, y0),
            (vx + 0.3 + 2 * t0, y0),
            (vx + 2 * t1, y1),
            (vx - 2 * t1, y1),
        ]
        c.polygon(dash, (230, 230, 220), ROAD)


def draw_fence(s: Scene) -> None:
    """A fence on one side of the road, on the pavement (60% of scenes)."""
    rng = s.rng
    if rng.random() >= 0.6:
        return
    side = rng.choice([-1, 1])
    fy0, fy1 = s.horizon + (s.h - s.horizon) * 0.05, s.horizon + (s.h - s.horizon) * 0.25
    xa = 0 if side < 0 else s.road_edge(fy1, 1) + 4
    xb = s.road_edge(fy1, -1) - 4 if side < 0 else s.w
    fc = jitter(rng, (110, 90, 70), 30)
    s.canvas.rect((xa, fy0, xb, fy0 + 2), fc, FENCE)
    for sx in np.arange(xa, xb, rng.uniform(3, 4)):
        s.canvas.rect((sx, fy0, sx + 2, fy1), fc, FENCE)


def draw_car(s: Scene, y: float, scale: float, side: int) -> None:
    rng, c = s.rng, s.canvas
    cx = s.vx + side * rng.uniform(0.1, 0.6) * (s.road_edge(y, 1) - s.vx)
    cw, ch = s.w * 0.22 * scale, s.h * 0.12 * scale
    choices = [(40, 40, 45), (170, 30, 30), (200, 200, 205), (30, 60, 140)]
    body = jitter(rng, tuple(rng.choice(choices)), 25)
    half, top, roof = cw / 2, y - ch * 0.55, y - ch
    c.polygon(
        [(cx - half, top), (cx + half, top), (cx + half, y - ch * 0.1), (cx - half, y - ch * 0.1)],
        body,
        CAR,
    )
    c.polygon(
        [
            (cx - cw * 0.3, roof),
            (cx + cw * 0.3, roof),
            (cx + cw * 0.42, top),
            (cx - cw * 0.42, top),
        ],
        body,
        CAR,
    )
    window = (cx - cw * 0.25, y - ch * 0.92, cx + cw * 0.25, y - ch * 0.6)
    c.paint(window, jitter(rng, (40, 50, 60), 15))
    for wx in (cx - cw * 0.32, cx + cw * 0.32):
        c.ellipse((wx - ch * 0.18, y - ch * 0.3, wx + ch * 0.18, y), (20, 20, 20), CAR)


def draw_tree(s: Scene, y: float, scale: float, side: int) -> None:
    rng, c = s.rng, s.canvas
    tx = s.road_edge(y, side) + side * rng.uniform(3, 25) * scale
    r = s.h * rng.uniform(0.08, 0.16) * scale * 2
    c.rect((tx - r * 0.08, y - r * 1.6, tx + r * 0.08, y), jitter(rng, (90, 60, 30), 20), TREE)
    crown_y = y - r * 1.8
    crown = (tx - r, crown_y - r, tx + r, crown_y + r * 0.8)
    c.ellipse(crown, jitter(rng, (60, 110, 40), 30), TREE)
    for _ in range(25):  # leaf texture inside the crown
        lx, ly = tx + rng.uniform(-0.7, 0.7) * r, crown_y + rng.uniform(-0.7, 0.5) * r
        lr = r * rng.uniform(0.08, 0.2)
        c.draw.ellipse((lx - lr, ly - lr, lx + lr, ly + lr), fill=jitter(rng, (70, 130, 50), 40))


def draw_pole(s: Scene, y: float, scale: float, side: int) -> None:
    rng, c = s.rng, s.canvas
    px = s.road_edge(y, side) + side * rng.uniform(2, 8) * scale
    ph, pw = s.h * 0.55 * scale, max(1.5, 2.5 * scale)
    c.rect((px - pw, y - ph, px + pw, y), jitter(rng, (120, 120, 110), 20), POLE)
    if rng.random() < 0.6:
        sr = max(4, 9 * scale)
        sc = tuple(rng.choice([(200, 30, 30), (30, 70, 180), (230, 200, 30)]))
        sign = (px - sr, y - ph - sr, px + sr, y - ph + sr)
        if rng.random() < 0.5:
            c.ellipse(sign, sc, SIGN)
        else:
            c.rect(sign, sc, SIGN)


def draw_person(s: Scene, y: float, scale: float, side: int, cyclist: bool) -> None:
    rng, c = s.rng, s.canvas
    px = s.road_edge(y, side) + side * rng.uniform(4, 30) * scale
    ph = s.h * 0.32 * scale
    cls = BICYCLIST if cyclist else PEDESTRIAN
    if cyclist:
        wr = ph * 0.22
        for wx in (px - ph * 0.3, px + ph * 0.3):
            c.ellipse((wx - wr, y - 2 * wr, wx + wr, y), (30, 30, 30), cls)
        y -= wr * 1.2
    c.ellipse(
        (px - ph * 0.18, y - ph * 0.8, px + ph * 0.18, y), jitter(rng, (60, 60, 100), 50), cls
    )
    head = (px - ph * 0.09, y - ph, px + ph * 0.09, y - ph * 0.8)
    c.ellipse(head, jitter(rng, (200, 160, 130), 30), cls)


def draw_void(s: Scene, y: float, scale: float) -> None:
    """Clutter labelled ignore."""
    x, size = s.rng.uniform(0, s.w), s.h * 0.08 * scale
    triangle = [(x, y - size), (x + size, y), (x - size, y)]
    s.canvas.polygon(triangle, jitter(s.rng, (128, 128, 128), 100), IGNORE_INDEX)


OBJECT_COUNTS = (  # kind, (min, max) count, (min, max) depth
    ("tree", (1, 4), (0.05, 0.5)),
    ("pole", (1, 4), (0.1, 0.9)),
    ("car", (1, 4), (0.15, 0.95)),
    ("person", (0, 4), (0.2, 0.95)),
    ("cyclist", (0, 2), (0.2, 0.95)),
    ("void", (0, 3), (0.1, 0.9)),
)


def draw_objects(s: Scene) -> None:
    """Objects far to near, so that near ones occlude far ones; size by distance."""
    objects = [
        (kind, s.rng.uniform(*depth))
        for kind, count, depth in OBJECT_COUNTS
        for _ in range(s.rng.integers(*count))
    ]
    for kind, depth in sorted(objects, key=lambda o: o[1]):
        y = s.horizon + (s.h - s.horizon) * depth  # ground contact line
        scale = 0.15 + 0.85 * depth
        side = int(s.rng.choice([-1, 1]))
        if kind == "car":
            draw_car(s, y, scale, side)
        elif kind == "tree":
            draw_tree(s, y, scale, side)
        elif kind == "pole":
            draw_pole(s, y, scale, side)
        elif kind in ("person", "cyclist"):
            draw_person(s, y, scale, side, cyclist=kind == "cyclist")
        else:
            draw_void(s, y, scale)


def finish(s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The camera: blur, lighting, colour cast, sensor noise."""
    rng = s.rng
    image = s.canvas.image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0)))
    rgb = np.asarray(image, dtype=np.float64)
    gain, cast = rng.uniform(0.6, 1.3), rng.uniform(0.9, 1.1, size=3)
    rgb = rgb * gain * cast + rng.normal(0, rng.uniform(2, 8), rgb.shape)
    label = np.asarray(s.canvas.label, dtype=np.uint8).copy()
    return np.clip(rgb, 0, 255).astype(np.uint8), label


def render_scene(seed: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H, W, 3) uint8 RGB and (H, W) uint8 CamVid train ids (255 = void)."""
    rng = np.random.default_rng(seed)
    horizon = height * rng.uniform(0.35, 0.5)
    vx = width * rng.uniform(0.35, 0.65)
    scene = Scene(rng, Canvas(width, height), width, height, horizon, vx)
    for layer in (draw_sky, draw_buildings, draw_ground, draw_fence, draw_objects):
        layer(scene)
    return finish(scene)
