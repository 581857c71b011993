"""Synthetic street scenes with CamVid's 11 classes and palette: the pipeline's no-download dataset.

Each scene is drawn from its own seed (dataset seed, split, index), so the data is the same on any
machine: a sky gradient over a horizon; buildings with window grids; a road in perspective with
dashed lane markings towards a vanishing point; pavements on both sides; fences, trees, poles with
signs; cars on the road and pedestrians / cyclists on the pavement, sized by their distance; some
void clutter labelled 255. Then random lighting, colour cast, blur and noise. Colours of the
classes overlap (grey buildings, roads and pavements; dark cars), so a model must use texture and
layout, not a colour lookup.
"""

from __future__ import annotations

import dataclasses
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.datasets.base import IGNORE_INDEX, Item, Reader, Sample
from pipeline.datasets.camvid import CAMVID_INFO

SKY, BUILDING, POLE, ROAD, PAVEMENT, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST = range(11)
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def _jitter(
    rng: np.random.Generator, colour: tuple[int, int, int], spread: int
) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in colour)  # type: ignore[return-value]


class Canvas:
    """Draws each shape into the image and its class into the label at once."""

    def __init__(self, width: int, height: int) -> None:
        self.image = Image.new("RGB", (width, height))
        self.label = Image.new("L", (width, height), IGNORE_INDEX)
        self.draw = ImageDraw.Draw(self.image)
        self.mask = ImageDraw.Draw(self.label)

    def polygon(
        self, points: list[tuple[float, float]], colour: tuple[int, int, int], cls: int
    ) -> None:
        self.draw.polygon(points, fill=colour)
        self.mask.polygon(points, fill=cls)

    def rect(
        self, box: tuple[float, float, float, float], colour: tuple[int, int, int], cls: int
    ) -> None:
        x0, y0, x1, y1 = box
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        self.draw.rectangle(box, fill=colour)
        self.mask.rectangle(box, fill=cls)

    def ellipse(
        self, box: tuple[float, float, float, float], colour: tuple[int, int, int], cls: int
    ) -> None:
        self.draw.ellipse(box, fill=colour)
        self.mask.ellipse(box, fill=cls)

    def paint(self, box: tuple[float, float, float, float], colour: tuple[int, int, int]) -> None:
        """Texture: colour only, the label keeps the class below."""
        self.draw.rectangle(box, fill=colour)


def render_scene(seed: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H, W, 3) uint8 RGB and (H, W) uint8 CamVid train ids (255 = void)."""
    rng = np.random.default_rng(seed)
    c = Canvas(width, height)
    w, h = width, height
    horizon = h * rng.uniform(0.35, 0.5)
    vx = w * rng.uniform(0.35, 0.65)  # vanishing point

    # Sky: vertical gradient between two random blues/greys.
    top, bottom = (
        np.array(_jitter(rng, (90, 140, 210), 40)),
        np.array(_jitter(rng, (200, 210, 225), 30)),
    )
    for row in range(int(horizon) + 1):
        t = row / max(horizon, 1)
        red, green, blue = (int(v) for v in top * (1 - t) + bottom * t)
        c.rect((0, row, w, row), (red, green, blue), SKY)

    # Buildings along the horizon, with window grids.
    x = -rng.uniform(0, 20)
    while x < w:
        bw = w * rng.uniform(0.12, 0.3)
        top_y = h * rng.uniform(0.03, 0.25)
        colour = _jitter(rng, (rng.choice([120, 150, 110]), 100, 90), 35)
        c.rect((x, top_y, x + bw, horizon + h * 0.05), colour, BUILDING)
        win = (
            _jitter(rng, (50, 60, 80), 25)
            if rng.random() < 0.7
            else _jitter(rng, (200, 200, 150), 30)
        )
        step_x, step_y = rng.uniform(6, 12), rng.uniform(7, 13)
        wy = top_y + 4
        while wy + 4 < horizon:
            wx = x + 3
            while wx + 4 < x + bw - 2:
                c.paint((wx, wy, wx + step_x * 0.5, wy + step_y * 0.5), win)
                wx += step_x
            wy += step_y
        x += bw + rng.uniform(-4, 6)

    # Pavements (below the buildings), then the road in perspective over them.
    pave = _jitter(rng, (150, 140, 130), 30)
    c.rect((0, horizon, w, h), pave, PAVEMENT)
    for gy in np.arange(horizon + 4, h, rng.uniform(5, 9)):  # paving joints
        c.draw.line((0, gy, w, gy), fill=_jitter(rng, pave, 25), width=1)
    half_near = w * rng.uniform(0.3, 0.45)
    road = _jitter(rng, (85, 85, 90), 25)
    road_poly = [(vx - 2, horizon), (vx + 2, horizon), (vx + half_near, h), (vx - half_near, h)]
    c.polygon(road_poly, road, ROAD)
    for t0 in np.arange(0.05, 1.0, 0.12):  # dashed centre line
        t1 = min(t0 + 0.06, 1.0)
        y0, y1 = horizon + (h - horizon) * t0, horizon + (h - horizon) * t1
        c.polygon([(vx - 0.3 - 2 * t0, y0), (vx + 0.3 + 2 * t0, y0), (vx + 2 * t1, y1), (vx - 2 * t1, y1)],
                  (230, 230, 220), ROAD)  # fmt: skip

    def road_edge(y: float, side: int) -> float:
        t = (y - horizon) / (h - horizon)
        return vx + side * (2 + (half_near - 2) * t)

    # Fence on one side, on the pavement.
    if rng.random() < 0.6:
        side = rng.choice([-1, 1])
        fy0, fy1 = horizon + (h - horizon) * 0.05, horizon + (h - horizon) * 0.25
        xa = 0 if side < 0 else road_edge(fy1, 1) + 4
        xb = road_edge(fy1, -1) - 4 if side < 0 else w
        fc = _jitter(rng, (110, 90, 70), 30)
        c.rect((xa, fy0, xb, fy0 + 2), fc, FENCE)
        for sx in np.arange(xa, xb, rng.uniform(3, 4)):
            c.rect((sx, fy0, sx + 2, fy1), fc, FENCE)

    # Objects, far to near, so that near ones occlude far ones.
    objects = []
    for _ in range(rng.integers(1, 4)):
        objects.append(("tree", rng.uniform(0.05, 0.5)))
    for _ in range(rng.integers(1, 4)):
        objects.append(("pole", rng.uniform(0.1, 0.9)))
    for _ in range(rng.integers(1, 4)):
        objects.append(("car", rng.uniform(0.15, 0.95)))
    for _ in range(rng.integers(0, 4)):
        objects.append(("person", rng.uniform(0.2, 0.95)))
    for _ in range(rng.integers(0, 2)):
        objects.append(("cyclist", rng.uniform(0.2, 0.95)))
    for _ in range(rng.integers(0, 3)):
        objects.append(("void", rng.uniform(0.1, 0.9)))
    for kind, depth in sorted(objects, key=lambda o: o[1]):
        y = horizon + (h - horizon) * depth  # ground contact line
        s = 0.15 + 0.85 * depth  # scale by distance
        side = rng.choice([-1, 1])
        if kind == "car":
            cx = vx + side * rng.uniform(0.1, 0.6) * (road_edge(y, 1) - vx)
            cw, ch = w * 0.22 * s, h * 0.12 * s
            body = _jitter(
                rng,
                tuple(rng.choice([(40, 40, 45), (170, 30, 30), (200, 200, 205), (30, 60, 140)])),
                25,
            )
            c.polygon([(cx - cw / 2, y - ch * 0.55), (cx + cw / 2, y - ch * 0.55), (cx + cw / 2, y - ch * 0.1),
                       (cx - cw / 2, y - ch * 0.1)], body, CAR)  # fmt: skip
            c.polygon([(cx - cw * 0.3, y - ch), (cx + cw * 0.3, y - ch), (cx + cw * 0.42, y - ch * 0.55),
                       (cx - cw * 0.42, y - ch * 0.55)], body, CAR)  # fmt: skip
            c.paint(
                (cx - cw * 0.25, y - ch * 0.92, cx + cw * 0.25, y - ch * 0.6),
                _jitter(rng, (40, 50, 60), 15),
            )
            for wx in (cx - cw * 0.32, cx + cw * 0.32):
                c.ellipse((wx - ch * 0.18, y - ch * 0.3, wx + ch * 0.18, y), (20, 20, 20), CAR)
        elif kind == "tree":
            tx = road_edge(y, side) + side * rng.uniform(3, 25) * s
            r = h * rng.uniform(0.08, 0.16) * s * 2
            c.rect(
                (tx - r * 0.08, y - r * 1.6, tx + r * 0.08, y), _jitter(rng, (90, 60, 30), 20), TREE
            )
            crown_y = y - r * 1.8
            c.ellipse(
                (tx - r, crown_y - r, tx + r, crown_y + r * 0.8),
                _jitter(rng, (60, 110, 40), 30),
                TREE,
            )
            for _ in range(25):  # leaf texture inside the crown
                lx, ly = tx + rng.uniform(-0.7, 0.7) * r, crown_y + rng.uniform(-0.7, 0.5) * r
                lr = r * rng.uniform(0.08, 0.2)
                c.draw.ellipse(
                    (lx - lr, ly - lr, lx + lr, ly + lr), fill=_jitter(rng, (70, 130, 50), 40)
                )
        elif kind == "pole":
            px = road_edge(y, side) + side * rng.uniform(2, 8) * s
            ph = h * 0.55 * s
            c.rect(
                (px - max(1.5, 2.5 * s), y - ph, px + max(1.5, 2.5 * s), y),
                _jitter(rng, (120, 120, 110), 20),
                POLE,
            )
            if rng.random() < 0.6:
                sr = max(4, 9 * s)
                sc = tuple(rng.choice([(200, 30, 30), (30, 70, 180), (230, 200, 30)]))
                if rng.random() < 0.5:
                    c.ellipse((px - sr, y - ph - sr, px + sr, y - ph + sr), sc, SIGN)
                else:
                    c.rect((px - sr, y - ph - sr, px + sr, y - ph + sr), sc, SIGN)
        elif kind in ("person", "cyclist"):
            px = road_edge(y, side) + side * rng.uniform(4, 30) * s
            ph = h * 0.32 * s
            cls = PEDESTRIAN if kind == "person" else BICYCLIST
            if kind == "cyclist":
                wr = ph * 0.22
                for wx in (px - ph * 0.3, px + ph * 0.3):
                    c.ellipse((wx - wr, y - 2 * wr, wx + wr, y), (30, 30, 30), cls)
                y -= wr * 1.2
            c.ellipse(
                (px - ph * 0.18, y - ph * 0.8, px + ph * 0.18, y),
                _jitter(rng, (60, 60, 100), 50),
                cls,
            )
            c.ellipse(
                (px - ph * 0.09, y - ph, px + ph * 0.09, y - ph * 0.8),
                _jitter(rng, (200, 160, 130), 30),
                cls,
            )
        else:  # void clutter
            vxx, vs = rng.uniform(0, w), h * 0.08 * s
            c.polygon(
                [(vxx, y - vs), (vxx + vs, y), (vxx - vs, y)],
                _jitter(rng, (128, 128, 128), 100),
                IGNORE_INDEX,
            )

    # Camera: blur, lighting, colour cast, sensor noise.
    image = c.image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0)))
    rgb = np.asarray(image, dtype=np.float64)
    rgb = rgb * rng.uniform(0.6, 1.3) * rng.uniform(0.9, 1.1, size=3) + rng.normal(
        0, rng.uniform(2, 8), rgb.shape
    )
    return np.clip(rgb, 0, 255).astype(np.uint8), np.asarray(c.label, dtype=np.uint8).copy()


def scene_seed(seed: int, split: str, index: int) -> int:
    return zlib.crc32(f"{seed}/{split}/{index}".encode())


@dataclass
class SyntheticReader(Reader):
    """Generated scenes; ``root`` is unused. Sizes per split and image size come from params."""

    root: Path = Path(".")
    num_samples: dict[str, int] = field(default_factory=lambda: {"train": 200, "val": 50})
    width: int = 160
    height: int = 120
    seed: int = 0

    def __post_init__(self) -> None:
        self.info = dataclasses.replace(CAMVID_INFO, name="synthetic")
        self.splits = tuple(self.num_samples)

    def items(self, split: str) -> list[Item]:
        if split not in self.num_samples:
            raise KeyError(
                f"synthetic split {split!r} is not configured; have {', '.join(self.num_samples)}"
            )
        return [
            Item(
                f"synthetic_{split}_{i:06d}",
                f"synthetic:seed={self.seed}:{split}:{i}",
                f"{split}:{i}",
            )
            for i in range(self.num_samples[split])
        ]

    def read(self, item: Item) -> Sample:
        _, _, split, index = item.image.split(":")
        rgb, label = render_scene(scene_seed(self.seed, split, int(index)), self.width, self.height)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=6)
        return Sample(item.key, buffer.getvalue(), "png", label, item.image)


def write_folder_dataset(
    reader: SyntheticReader, out: Path, splits: tuple[str, ...], count: int = 0
) -> list[Path]:
    """Scenes as a ``folder`` dataset (images/{split}/, masks/{split}/, classes.txt), e.g. images
    to try ``danet predict`` on. ``count`` > 0 keeps the first ``count`` of each split. The folder
    appears atomically; returns the image files."""
    from pipeline.atomic import atomic_dir

    images: list[Path] = []
    with atomic_dir(out) as tmp:
        lines = [
            f"{n} {r} {g} {b}"
            for n, (r, g, b) in zip(reader.info.classes, reader.info.palette, strict=True)
        ]
        (tmp / "classes.txt").write_text("\n".join(lines) + "\n")
        for split in splits:
            for item in reader.items(split)[: count or None]:
                sample = reader.read(item)
                for kind in ("images", "masks"):
                    path = tmp / kind / split / f"{item.key}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if kind == "masks":
                        Image.fromarray(sample.label, mode="L").save(path)
                    else:
                        path.write_bytes(sample.image_bytes)
                images.append(out / "images" / split / f"{item.key}.png")
    return images
