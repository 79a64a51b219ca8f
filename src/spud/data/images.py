"""Built-in image–text data: small pictures drawn with Pillow, each with a caption and questions.

Six kinds of scene, each deterministic from a seed and rendered at the model's image size:

| kind       | picture                                   | questions (type: answer)                    |
|------------|-------------------------------------------|---------------------------------------------|
| number     | a number 0-99 in some font, size, colour  | number: "47" · colour: "red"                |
| word       | a short word                              | word: "cat" · colour                        |
| count      | 1-6 circles, squares or triangles         | count: "4" · shape: "squares" · colour      |
| locate     | a shape in a corner or the middle         | locate: "top left" · shape                  |
| bar        | a bar chart of three coloured bars        | bar: colour of the tallest / shortest bar   |
| arithmetic | a sum or difference of one-digit numbers  | arithmetic: "7"                             |

Held out by construction, like the text generators (spud.data.facts): every scene has a *fact*,
the part of it a question is about (the number and the font it is drawn in, the count with the
shape and colour, the bar heights, the sum...), and a fact whose hash falls in 1 of
`IMAGE_SHARDS` buckets is only ever drawn for the held-out split; the training split never draws
it. Question wordings are split the same way (spud.data.facts.template_held_out), so the eval can
also ask in words the model never saw. `check_disjoint` verifies the result by image hash.

Fonts: PIL's own default font (always there) plus the TrueType fonts of `KNOWN_FONTS` found on
the machine; which of them exist is part of what a data set records (`font_names`), and tests
can pin `fonts=("default",)` for machine-independent data.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from spud.data.facts import template_held_out

IMAGE_SHARDS = 8  # 1 in 8 facts of each kind is drawn for the held-out split only
KINDS = ("number", "word", "count", "locate", "bar", "arithmetic")
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")
KNOWN_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
               "LiberationSans-Regular.ttf", "LiberationSerif-Regular.ttf", "LiberationMono-Regular.ttf",
               "LiberationSans-Bold.ttf", "Arial.ttf", "Times New Roman.ttf", "Courier New.ttf")
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (240, 210, 30),
           "orange": (245, 140, 20), "purple": (140, 60, 190), "black": (20, 20, 20), "white": (250, 250, 250)}
BACKGROUNDS = {"white": (255, 255, 255), "light gray": (200, 200, 200), "black": (0, 0, 0),
               "dark blue": (20, 30, 80), "cream": (250, 240, 210)}
SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles"}
REGIONS = ("top left", "top right", "bottom left", "bottom right", "middle")
WORDS = ("cat", "dog", "sun", "box", "car", "hat", "pen", "cup", "map", "bus", "key", "egg", "fox",
         "owl", "bed", "toy", "ice", "jam", "sky", "tea")

# Question wordings per question type, with stable ids (held out by id, never by position).
QUESTIONS: dict[str, list[tuple[str, str]]] = {
    "number": [("n1", "Which number is shown?"), ("n2", "What number is in the image?"),
               ("n3", "What number do you see?"), ("n4", "Read the number in the picture."),
               ("n5", "Which number is written here?"), ("n6", "What is the number in this image?"),
               ("n7", "Tell me the number shown."), ("n8", "What number is this?")],
    "word": [("w1", "What word is written?"), ("w2", "Which word is shown?"), ("w3", "Read the word in the image."),
             ("w4", "What does the image say?"), ("w5", "What word do you see?"),
             ("w6", "Which word is in the picture?")],
    "count": [("c1", "How many shapes are there?"), ("c2", "How many {shapes} are there?"),
              ("c3", "Count the {shapes}."), ("c4", "How many shapes do you see?"),
              ("c5", "How many {shapes} are in the image?"), ("c6", "Count the shapes in the picture."),
              ("c7", "What is the number of {shapes}?"), ("c8", "How many objects are shown?")],
    "shape": [("s1", "What shape is shown?"), ("s2", "Which shape do you see?"), ("s3", "What kind of shape is it?"),
              ("s4", "Name the shape in the image."), ("s5", "What shape is in the picture?")],
    "colour": [("k1", "What colour is it?"), ("k2", "Which colour is used?"), ("k3", "What color is it drawn in?"),
               ("k4", "What is the colour of the drawing?"), ("k5", "Which color do you see?")],
    "locate": [("l1", "Where is the {colour} {shape}?"), ("l2", "Where is the {shape}?"),
               ("l3", "In which part of the image is the {colour} {shape}?"), ("l4", "Where is the {shape} placed?"),
               ("l5", "Which corner is the {shape} in, or is it in the middle?"),
               ("l6", "Locate the {colour} {shape}.")],
    "bar": [("b1", "Which bar is the {most}?"), ("b2", "What colour is the {most} bar?"),
            ("b3", "Which colour has the {most} bar?"), ("b4", "In the chart, which bar is {most}?"),
            ("b5", "Which bar in the chart is the {most}?"), ("b6", "Name the colour of the {most} bar.")],
    "arithmetic": [("a1", "What is the answer?"), ("a2", "Solve the problem in the image."),
                   ("a3", "What does the problem in the picture equal?"), ("a4", "Work out what is written."),
                   ("a5", "What is the result?"), ("a6", "Compute what the image shows.")],
    "caption": [("d1", "Describe the image."), ("d2", "What is in this picture?"),
                ("d3", "Describe this picture briefly."),
                ("d4", "What does the image show?"), ("d5", "Give a short description of the image.")],
}


@dataclass
class Sample:
    kind: str
    fact: str                         # what the split is decided by (see module doc)
    image: Image.Image
    caption: str
    qa: list[tuple[str, str, str]] = field(default_factory=list)  # (question type, question, answer)
    words: dict = field(default_factory=dict)  # what question wordings name: {shape}, {colour}, ...

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


def fact_held_out(kind: str, fact: str) -> bool:
    return hashlib.sha256(f"spud-image/{kind}/{fact}".encode()).digest()[0] % IMAGE_SHARDS == 0


def wordings(qtype: str, held_out: bool) -> list[tuple[str, str]]:
    return [w for w in QUESTIONS[qtype] if template_held_out(f"vqa-{qtype}", w[0]) == held_out]


def image_hash(image: Image.Image) -> str:
    """Of the pixels, not of a file encoding: two PNGs of the same picture hash the same."""
    im = image.convert("RGB")
    return hashlib.sha256(f"{im.size}".encode() + im.tobytes()).hexdigest()


def check_disjoint(train: list[Sample], held: list[Sample]) -> int:
    """How many held-out pictures also occur among the training pictures (0 by construction)."""
    seen = {image_hash(s.image) for s in train}
    return sum(image_hash(s.image) in seen for s in held)


# ------------------------------------------------------------------------------------ fonts
@lru_cache(maxsize=None)
def available_fonts() -> tuple[str, ...]:
    """'default' (PIL's own font, always present) + the KNOWN_FONTS this machine has, by name."""
    found: dict[str, Path] = {}
    for root in FONT_DIRS:
        base = Path(root)
        if base.is_dir():
            for p in base.rglob("*.ttf"):
                if p.name in KNOWN_FONTS and p.name not in found:
                    found[p.name] = p
    _FONT_PATHS.update(found)
    return ("default", *sorted(found))


_FONT_PATHS: dict[str, Path] = {}


@lru_cache(maxsize=4096)
def _font(name: str, px: int):
    if name == "default":
        return ImageFont.load_default(size=px)
    return ImageFont.truetype(str(_FONT_PATHS[name]), px)


def _lum(c: tuple[int, int, int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _contrasting(rng: random.Random, bg: tuple[int, int, int], names=tuple(COLOURS)) -> str:
    ok = [n for n in names if abs(_lum(COLOURS[n]) - _lum(bg)) > 70]
    return rng.choice(ok or list(names))


def _canvas(rng: random.Random, size: int, light_only: bool = False,
            behind: str | None = None) -> tuple[str, Image.Image, ImageDraw.ImageDraw]:
    """A background (jittered a little, so no two pictures share one exactly): a light one, one
    that contrasts with the colour `behind` will be drawn in, or any."""
    names = ["white", "light gray", "cream"] if light_only else list(BACKGROUNDS)
    if behind is not None:
        names = [n for n in names if abs(_lum(BACKGROUNDS[n]) - _lum(COLOURS[behind])) > 70]
    bg_name = rng.choice(names)
    bg = tuple(max(0, min(255, v + rng.randint(-12, 12))) for v in BACKGROUNDS[bg_name])
    im = Image.new("RGB", (size, size), bg)
    return bg_name, im, ImageDraw.Draw(im)


def _text(rng, draw, size: int, text: str, font_name: str, fill) -> None:
    """Draw `text` as large as a random share of the canvas allows, at a random place inside it."""
    px = rng.randint(max(8, size * 4 // 10), max(9, size * 8 // 10))
    while True:
        font = _font(font_name, px)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        if (x1 - x0 <= size - 2 and y1 - y0 <= size - 2) or px <= 6:
            break
        px -= 1
    x = rng.randint(1, max(1, size - 1 - (x1 - x0))) - x0
    y = rng.randint(1, max(1, size - 1 - (y1 - y0))) - y0
    draw.text((x, y), text, font=font, fill=fill)


def _shape(draw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


# ----------------------------------------------------------------------------------- scenes
# Each scene maker: (rng, size, fonts, held_out) -> Sample, drawing facts until one of the
# requested split turns up (cheap: the fact is chosen before anything is drawn).
def _draw_fact(rng: random.Random, kind: str, held_out: bool, make):
    while True:
        params = make()
        fact = "|".join(map(str, params))
        if fact_held_out(kind, fact) == held_out:
            return params, fact


def _number(rng, size, fonts, held_out) -> Sample:
    (n, font), fact = _draw_fact(rng, "number", held_out, lambda: (rng.randint(0, 99), rng.choice(fonts)))
    bg_name, im, draw = _canvas(rng, size)
    colour = _contrasting(rng, BACKGROUNDS[bg_name])
    _text(rng, draw, size, str(n), font, COLOURS[colour])
    return Sample("number", fact, im, f"The number {n} written in {colour} on a {bg_name} background.",
                  [("number", "", str(n)), ("colour", "", colour)])


def _word(rng, size, fonts, held_out) -> Sample:
    (word, font), fact = _draw_fact(rng, "word", held_out, lambda: (rng.choice(WORDS), rng.choice(fonts)))
    bg_name, im, draw = _canvas(rng, size)
    colour = _contrasting(rng, BACKGROUNDS[bg_name])
    _text(rng, draw, size, word, font, COLOURS[colour])
    return Sample("word", fact, im, f'The word "{word}" written in {colour} on a {bg_name} background.',
                  [("word", "", word), ("colour", "", colour)])


def _cells(rng, size: int, k: int) -> list[tuple[int, int, int, int]]:
    """k boxes in distinct cells of a 3×3 grid: shapes never overlap, so the count is visible."""
    cell = size // 3
    boxes = []
    for c in rng.sample(range(9), k):
        hi = max(2, cell - 2)  # a 1-pixel margin in the cell: a gap between any two shapes
        s = rng.randint(min(hi, max(3, cell // 2)), hi)
        x = (c % 3) * cell + 1 + rng.randint(0, cell - 2 - s)
        y = (c // 3) * cell + 1 + rng.randint(0, cell - 2 - s)
        boxes.append((x, y, x + s - 1, y + s - 1))
    return boxes


def _count(rng, size, fonts, held_out) -> Sample:
    (k, shape, colour), fact = _draw_fact(
        rng, "count", held_out, lambda: (rng.randint(1, 6), rng.choice(list(SHAPES)), rng.choice(list(COLOURS))))
    bg_name, im, draw = _canvas(rng, size, behind=colour)
    for box in _cells(rng, size, k):
        _shape(draw, shape, box, COLOURS[colour])
    plural = SHAPES[shape] if k != 1 else shape
    return Sample("count", fact, im, f"{k} {colour} {plural} on a {bg_name} background.",
                  [("count", "", str(k)), ("shape", "", SHAPES[shape]), ("colour", "", colour)],
                  words={"shapes": SHAPES[shape]})


_REGION_CELLS = {"top left": (0, 0), "top right": (2, 0), "bottom left": (0, 2), "bottom right": (2, 2),
                 "middle": (1, 1)}


def _locate(rng, size, fonts, held_out) -> Sample:
    (shape, colour, region), fact = _draw_fact(
        rng, "locate", held_out,
        lambda: (rng.choice(list(SHAPES)), rng.choice(["red", "green", "blue", "orange", "purple"]),
                 rng.choice(REGIONS)))
    bg_name, im, draw = _canvas(rng, size, light_only=True)
    cell = size // 3
    cx, cy = _REGION_CELLS[region]
    s = rng.randint(max(4, cell * 7 // 10), max(5, cell + cell // 3))
    x = min(size - s, max(0, cx * cell + (cell - s) // 2 + rng.randint(-1, 1)))
    y = min(size - s, max(0, cy * cell + (cell - s) // 2 + rng.randint(-1, 1)))
    _shape(draw, shape, (x, y, x + s - 1, y + s - 1), COLOURS[colour])
    return Sample("locate", fact, im, f"A {colour} {shape} in the {region} of a {bg_name} picture.",
                  [("locate", "", region), ("shape", "", shape)], words={"shape": shape, "colour": colour})


def _bar(rng, size, fonts, held_out) -> Sample:
    def draw_params():
        colours = rng.sample(["red", "green", "blue", "orange", "purple"], 3)
        heights = rng.sample(range(1, 6), 3)  # distinct: one tallest and one shortest bar
        return (*colours, *heights)
    params, fact = _draw_fact(rng, "bar", held_out, draw_params)
    colours, heights = params[:3], params[3:]
    bg_name, im, draw = _canvas(rng, size, light_only=True)
    base, unit = size - 2, (size - 4) / 5
    width = (size - 4) // 3
    draw.line([(0, base + 1), (size - 1, base + 1)], fill=(60, 60, 60))
    for i, (c, h) in enumerate(zip(colours, heights)):
        x = 2 + i * width
        draw.rectangle((x + 1, round(base - h * unit), x + width - 2, base), fill=COLOURS[c])
    tall, short = colours[heights.index(max(heights))], colours[heights.index(min(heights))]
    listing = ", ".join(f"{c} {h}" for c, h in zip(colours, heights))
    return Sample("bar", fact, im, f"A bar chart with three bars ({listing}); the {tall} bar is the tallest.",
                  [("bar", "tallest", tall), ("bar", "shortest", short)])


def _arithmetic(rng, size, fonts, held_out) -> Sample:
    def draw_params():
        op = rng.choice("+-")
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)
    (a, op, b), fact = _draw_fact(rng, "arithmetic", held_out, draw_params)
    font = rng.choice(fonts)
    bg_name, im, draw = _canvas(rng, size)
    colour = _contrasting(rng, BACKGROUNDS[bg_name])
    _text(rng, draw, size, f"{a}{op}{b}", font, COLOURS[colour])
    c = a + b if op == "+" else a - b
    return Sample("arithmetic", fact, im, f"The problem {a} {op} {b} written in {colour}; it equals {c}.",
                  [("arithmetic", "", str(c))])


_MAKERS = {"number": _number, "word": _word, "count": _count, "locate": _locate, "bar": _bar,
           "arithmetic": _arithmetic}


def _ask(rng: random.Random, qtype: str, extra: str, sample: Sample, held_out_wording: bool) -> str:
    _, tpl = rng.choice(wordings(qtype, held_out_wording))
    return tpl.format(most=extra, **sample.words)


def generate(n: int, seed: int, held_out: bool = False, size: int = 32, kinds=KINDS,
             fonts: tuple[str, ...] | None = None, held_out_wordings: bool = False) -> list[Sample]:
    """n scenes of the chosen split, kinds in turn, deterministic in every argument. Each sample's
    `qa` holds its questions in training wordings (or eval-only ones with held_out_wordings)."""
    if size < 16:
        raise ValueError(f"pictures are drawn at >= 16 pixels (counting needs room), got size={size}")
    fonts = tuple(fonts or available_fonts())
    unknown = [k for k in kinds if k not in _MAKERS]
    if unknown:
        raise ValueError(f"unknown image kinds {unknown}; choose from {', '.join(KINDS)}")
    if "default" not in fonts:
        available_fonts()  # fills the path table for the named fonts
    rng = random.Random(f"spud-images/{seed}/{'heldout' if held_out else 'train'}/{size}")
    out = []
    for i in range(n):
        s = _MAKERS[kinds[i % len(kinds)]](rng, size, fonts, held_out)
        s.qa = [(qt, _ask(rng, qt, extra, s, held_out_wordings), ans) for qt, extra, ans in s.qa]
        out.append(s)
    return out
