"""A model on pictures drawn by hand with Pillow, as a new user would draw them to try it.

Six pictures (128x128 to 1600x900, white, grey, dark, pale backgrounds; flat shapes in plain
colours) and 28 expressions: the targets a user would ask for first, a few positions, sizes and
groups, things that are not there and words from outside the model's world. An answer is right
when a target gets a mask with IoU >= 0.5, and when nothing is there and "no match" comes back.
None of this is used for training or for choosing a model.

    python benchmarks/hand_drawn.py default
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from sharedris import Predictor, load_pretrained

RGB = {"red": (230, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 230), "yellow": (250, 220, 0),
       "purple": (130, 40, 170), "orange": (255, 140, 0)}

# (size, background, objects as (shape, colour, centre, radius), expressions as (text, referred indices))
CASES = [
    ((300, 200), "white", [("circle", "red", (80, 100), 40), ("square", "blue", (220, 100), 40)],
     [("the red circle", (0,)), ("the blue square", (1,)), ("the green star", ()), ("the red cat", ())]),
    ((128, 128), (128, 128, 128), [("circle", "red", (30, 30), 14), ("triangle", "green", (95, 35), 15),
                                   ("star", "yellow", (35, 95), 16), ("hexagon", "purple", (95, 95), 15)],
     [("the red circle", (0,)), ("the green triangle", (1,)), ("the yellow star", (2,)),
      ("the purple hexagon", (3,)), ("the blue circle", ())]),
    ((800, 600), (235, 235, 255), [("diamond", "orange", (150, 300), 90), ("circle", "blue", (400, 150), 70),
                                   ("square", "green", (620, 420), 80)],
     [("the orange diamond", (0,)), ("the blue circle", (1,)), ("the green square", (2,)), ("the pink square", ())]),
    ((1600, 900), (20, 20, 30), [("star", "red", (300, 450), 150), ("star", "blue", (1200, 450), 150),
                                 ("circle", "yellow", (800, 200), 100)],
     [("the red star", (0,)), ("the blue star", (1,)), ("the yellow circle", (2,)), ("the star on the left", (0,)),
      ("the star on the right", (1,)), ("all the stars", (0, 1))]),
    ((200, 500), (255, 250, 230), [("triangle", "purple", (100, 100), 50), ("square", "orange", (100, 350), 60)],
     [("the purple triangle", (0,)), ("the orange square", (1,)), ("the triangle at the top", (0,)),
      ("the purple square", ())]),
    ((400, 400), (90, 90, 90), [("circle", "green", (100, 100), 30), ("circle", "green", (300, 300), 70),
                                ("hexagon", "red", (300, 90), 40)],
     [("the small circle", (0,)), ("the big circle", (1,)), ("the red hexagon", (2,)),
      ("all the green shapes", (0, 1)), ("the zorblat", ())]),
]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a triangle, diamond, star or hexagon (circles and squares are drawn directly)."""
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)]
    if shape == "star":  # five points, inner radius half the outer
        return [(cx + (r if k % 2 == 0 else r / 2) * math.sin(k * math.pi / 5),
                 cy - (r if k % 2 == 0 else r / 2) * math.cos(k * math.pi / 5)) for k in range(10)]
    return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]


def draw(size: tuple[int, int], background, objects) -> tuple[Image.Image, list[np.ndarray]]:
    """The picture and each object's mask (its filled shape, drawn the same way)."""
    image = Image.new("RGB", size, background)
    masks = []
    for shape, colour, (cx, cy), r in objects:
        mask = Image.new("1", size)
        for canvas, fill in ((ImageDraw.Draw(image), RGB[colour]), (ImageDraw.Draw(mask), 1)):
            box = [cx - r, cy - r, cx + r, cy + r]
            if shape == "circle":
                canvas.ellipse(box, fill=fill)
            elif shape == "square":
                canvas.rectangle(box, fill=fill)
            else:
                canvas.polygon(_outline(shape, cx, cy, r), fill=fill)
        masks.append(np.asarray(mask))
    return image, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="'default' or a checkpoint folder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = Predictor(load_pretrained(args.model))
    right = total = 0
    for size, background, objects, asks in CASES:
        image, masks = draw(size, background, objects)
        out = predictor.predict(image, [text for text, _ in asks])
        for n, (text, referred) in enumerate(asks):
            truth = np.zeros(masks[0].shape, dtype=bool)
            for k in referred:
                truth |= masks[k]
            mask = out.masks[n]
            iou = (mask & truth).sum() / max((mask | truth).sum(), 1)
            ok = bool(iou >= 0.5) if referred else not out.matched[n]
            right += ok
            total += 1
            answer = f"mask IoU {iou:.2f}" if out.matched[n] else "no match"
            print(f"{size[0]}x{size[1]:<4} {text!r:26} {answer:<14} presence {out.present[n]:.3f}  "
                  f"{'right' if ok else 'WRONG'}")
    print(f"{right}/{total} right")


if __name__ == "__main__":
    main()
