"""shapes.py: the built-in procedural shapes world: scene graphs, images, captions, grammar."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# -------------------------------------------------------------------------------------------------
# The world's words.

SHAPES = ["circle", "square", "triangle", "star", "cross"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SIZES = ["small", "large"]
# One word per position, one token the model can match to an image cell (with two-word names like
# "top left" the toy model did not learn to bind words to cells in 1000 steps).
POSITIONS = ["top-left", "top", "top-right", "left", "center", "right",
             "bottom-left", "bottom", "bottom-right"]
NUMBERS = ["one", "two", "three", "four"]
RELATIONS = ["left of", "right of", "above", "below"]
GRID = 3  # the image is a GRID x GRID board of cells, POSITIONS in row-major order

# Caption templates, one sentence each, without the final "." (captions add " ." to each sentence).
# A {slot} stands for one value of SLOT_VALUES[slot's name before "_"]; values may be several words.
OBJECT = "{size} {colour} {shape}"
OBJECT_TEMPLATES = [
    "there is a " + OBJECT + " at the {pos}",
    "at the {pos} , there is a " + OBJECT,
    "a " + OBJECT + " is at the {pos}",
    "the {pos} has a " + OBJECT,
    "we can see a " + OBJECT + " at the {pos}",
]
# Count sentences: singular and plural forms are separate templates so the grammar stays exact.
SINGULAR_COUNT_TEMPLATES = ["there is one object", "there is one shape",
                            "the image shows one object", "the image shows one shape"]
PLURAL_COUNT_TEMPLATES = ["there are {many} objects", "there are {many} shapes",
                          "the image shows {many} objects", "the image shows {many} shapes"]
RELATION_TEMPLATE = "the {colour_a} {shape_a} is {rel} the {colour_b} {shape_b}"
ALL_TEMPLATES = (OBJECT_TEMPLATES + SINGULAR_COUNT_TEMPLATES + PLURAL_COUNT_TEMPLATES
                 + [RELATION_TEMPLATE])
SLOT_VALUES = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "pos": POSITIONS,
               "many": NUMBERS[1:], "rel": RELATIONS}
VOCAB = sorted({".", ","}
               | {w for t in ALL_TEMPLATES for w in t.split() if not w.startswith("{")}
               | {w for values in SLOT_VALUES.values() for v in values for w in v.split()})

# -------------------------------------------------------------------------------------------------
# The grammar: a sentence (list of words, no ".") matches a template exactly, or it does not parse.


def _slot_kind(token: str) -> str:
    return token.strip("{}").split("_")[0]


def _max_words(template: str) -> int:
    """Most words a sentence of this template can have, with its "."."""
    longest = {kind: max(len(v.split()) for v in values) for kind, values in SLOT_VALUES.items()}
    return 1 + sum(longest[_slot_kind(t)] if t.startswith("{") else 1 for t in template.split())


def _match(template: list[str], words: list[str], i: int, j: int, slots: dict) -> dict | None:
    """Match template[i:] against words[j:]; slots: slot name -> (value, start, end) word span."""
    if i == len(template):
        return slots if j == len(words) else None
    token = template[i]
    if not token.startswith("{"):
        return _match(template, words, i + 1, j + 1, slots) if words[j:j + 1] == [token] else None
    for n in (1, 2):  # slot values are one or two words ("left of")
        phrase = " ".join(words[j:j + n])
        if j + n <= len(words) and phrase in SLOT_VALUES[_slot_kind(token)]:
            filled = {**slots, token.strip("{}"): (phrase, j, j + n)}
            if (found := _match(template, words, i + 1, j + n, filled)) is not None:
                return found
    return None


_TEMPLATE_WORDS = [t.split() for t in ALL_TEMPLATES]
_LONGEST_SENTENCE = max(_max_words(t) for t in ALL_TEMPLATES)


def sentence_spans(words: list[str]) -> list[tuple[int, int]]:
    """[start, end) word ranges of a caption's sentences: split at ".", which is left out; a
    trailing fragment without "." is a sentence too, empty sentences are not."""
    spans, start = [], 0
    for k, w in enumerate(words + ["."]):
        if w == ".":
            if k > start:
                spans.append((start, k))
            start = k + 1
    return spans


def _claim_of(template: str, slots: dict) -> tuple:
    value = {name: v[0] for name, v in slots.items()}
    if template in OBJECT_TEMPLATES:
        return ("object", value["size"], value["colour"], value["shape"], value["pos"])
    if template in SINGULAR_COUNT_TEMPLATES:
        return ("count", 1)
    if template in PLURAL_COUNT_TEMPLATES:
        return ("count", NUMBERS.index(value["many"]) + 1)
    a, b = (value["colour_a"], value["shape_a"]), (value["colour_b"], value["shape_b"])
    rel = value["rel"]
    # Canonical direction: "A right of B" and "B left of A" are one claim (the repetition metric).
    if rel in ("right of", "below"):
        a, b, rel = b, a, {"right of": "left of", "below": "above"}[rel]
    return ("relation", *a, rel, *b)


def _matches(words: list[str]):
    """(template, slots) of each template a sentence matches, lazily, in ALL_TEMPLATES' order."""
    if words and len(words) < _LONGEST_SENTENCE:  # cheap rejection: fast on long garbage
        for template, template_words in zip(ALL_TEMPLATES, _TEMPLATE_WORDS):
            if (slots := _match(template_words, words, 0, 0, {})) is not None:
                yield template, slots


def parse_sentence(words: list[str]) -> tuple[tuple, dict] | None:
    """(claim, slots) of a sentence that matches a template, else None. Claims are hashable tuples:
    ("object", size, colour, shape, pos), ("count", n), ("relation", colour, shape, rel, colour,
    shape) with rel "left of" or "above"."""
    template, slots = next(_matches(words), (None, None))
    return None if template is None else (_claim_of(template, slots), slots)


def cell_of(pos: str) -> tuple[int, int]:
    return divmod(POSITIONS.index(pos), GRID)


def claim_holds(claim: tuple, scene: dict) -> bool:
    """Is a parsed claim true of the scene graph?"""
    objects = scene["objects"]
    if claim[0] == "object":
        _, size, colour, shape, pos = claim
        wanted = (shape, colour, size, *cell_of(pos))
        return any((o["shape"], o["colour"], o["size"], o["row"], o["col"]) == wanted
                   for o in objects)
    if claim[0] == "count":
        return claim[1] == len(objects)
    _, colour_a, shape_a, rel, colour_b, shape_b = claim
    left_or_above = "col" if rel == "left of" else "row"
    return any(a[left_or_above] < b[left_or_above]
               for a in objects if (a["colour"], a["shape"]) == (colour_a, shape_a)
               for b in objects if (b["colour"], b["shape"]) == (colour_b, shape_b))

# -------------------------------------------------------------------------------------------------
# Configuration, determinism and scene graphs.

SPLIT_ID = {"train": 0, "val": 1, "test": 2}  # distinct ids: the splits' seeds are disjoint
REFERENCE_SIZE, REFERENCE_JITTER = 48, 1.5    # jitter of 1.5 px at 48 px, scaled with image size
LONGEST_OBJECT_SENTENCE = max(_max_words(t) for t in OBJECT_TEMPLATES)


@dataclass
class WorldConfig:
    image_size: int = 48
    min_objects: int = 1
    max_objects: int = 4
    jitter: float | None = None  # position jitter in px; None: 1.5 px per 48 px of image
    p_count: float = 0.5         # probability of a count sentence (at the start or the end)
    p_relation: float = 0.3      # probability of each of up to MAX_RELATIONS relation sentences
    max_words: int = 63          # optional sentences are dropped until the caption fits

    def __post_init__(self) -> None:
        assert 1 <= self.min_objects <= self.max_objects <= GRID * GRID
        need = self.max_objects * LONGEST_OBJECT_SENTENCE
        if self.max_words < need:
            raise ValueError(f"captions of up to {self.max_words} words cannot hold "
                             f"{self.max_objects} object sentences of up to "
                             f"{LONGEST_OBJECT_SENTENCE} words; allow at least {need} words "
                             f"(train_stage1.py: --answer-len {need + 1} or more)")

    @property
    def jitter_px(self) -> float:
        scaled = REFERENCE_JITTER * self.image_size / REFERENCE_SIZE
        return self.jitter if self.jitter is not None else scaled


def scene_rng(split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SPLIT_ID[split], index])


def _pick(rng: np.random.Generator, options: list):  # one of the options, uniformly: one rng draw
    return options[rng.integers(len(options))]


def make_scene(rng: np.random.Generator, cfg: WorldConfig) -> dict:
    """1-4 objects, at most one per cell, as a JSON-able scene graph."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    return {"objects": [{"shape": _pick(rng, SHAPES), "colour": _pick(rng, COLOURS),
                         "size": _pick(rng, SIZES), "row": int(c) // GRID, "col": int(c) % GRID}
                        for c in cells]}

# -------------------------------------------------------------------------------------------------
# Rendering: drawn SUPERSAMPLE times larger and downsampled: small shapes keep recognisable edges.

PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 30)}
BACKGROUND, BACKGROUND_JITTER = (225, 225, 225), 8
SHADE_JITTER = 18                        # per-channel colour jitter: colours are ranges, not values
RADIUS = {"small": 0.22, "large": 0.40}  # object radius as a fraction of a cell side
SIZE_JITTER = 0.08                       # relative radius jitter
SUPERSAMPLE = 4
STAR_INNER = 0.45                        # inner / outer radius of the five-pointed star
CROSS_ARM = 0.35                         # half-width of a cross arm / its radius
SQUARE_HALF = 0.85                       # half-side / radius: a square of half-side r looks bigger


def _polygon(cx: float, cy: float, r: float, shape: str) -> list[tuple[float, float]]:
    """Outline of a shape centred at (cx, cy) with outer radius r (circle is drawn separately)."""
    if shape == "square":
        h = r * SQUARE_HALF
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        corners = (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)  # angles, from straight up
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in corners]
    if shape == "star":  # ten corners, on the outer and the inner radius in turn, from straight up
        corners = [(r if k % 2 == 0 else r * STAR_INNER, math.pi / 2 + k * math.pi / 5)
                   for k in range(10)]
        return [(cx + rr * math.cos(a), cy - rr * math.sin(a)) for rr, a in corners]
    w = r * CROSS_ARM  # cross: a plus sign, traced clockwise from the top arm
    steps = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
             (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    return [(cx + x, cy + y) for x, y in steps]


def render(scene: dict, rng: np.random.Generator, cfg: WorldConfig) -> Image.Image:
    side = cfg.image_size * SUPERSAMPLE
    cell = side / GRID
    background = tuple(int(c + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1))
                       for c in BACKGROUND)
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        dx, dy = rng.uniform(-1, 1, size=2) * cfg.jitter_px * SUPERSAMPLE
        cx, cy = (o["col"] + 0.5) * cell + dx, (o["row"] + 0.5) * cell + dy
        r = RADIUS[o["size"]] * cell * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
        shade = rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(PALETTE[o["colour"]]) + shade, 0, 255))
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(cx, cy, r, o["shape"]), fill=fill)
    return image.resize((cfg.image_size, cfg.image_size), Image.LANCZOS)

# -------------------------------------------------------------------------------------------------
# Captions: random object order, random templates, optional count and relation sentences.

MAX_RELATIONS = 2


def _fill(template: str, **values: str) -> str:
    return template.format(**values) + " ."


def _object_sentence(o: dict, rng: np.random.Generator) -> str:
    template = _pick(rng, OBJECT_TEMPLATES)
    return _fill(template, size=o["size"], colour=o["colour"], shape=o["shape"],
                 pos=POSITIONS[o["row"] * GRID + o["col"]])


def _count_sentence(n: int, rng: np.random.Generator) -> str:
    templates = SINGULAR_COUNT_TEMPLATES if n == 1 else PLURAL_COUNT_TEMPLATES
    return _fill(_pick(rng, templates), many=NUMBERS[n - 1])


def _true_relations(a: dict, b: dict) -> list[str]:
    """The relation words true of "a ... b" (left of: a smaller column; above: a smaller row)."""
    horizontal = ["left of" if a["col"] < b["col"] else "right of"] if a["col"] != b["col"] else []
    vertical = ["above" if a["row"] < b["row"] else "below"] if a["row"] != b["row"] else []
    return horizontal + vertical


def _relation_sentences(scene: dict, rng: np.random.Generator, cfg: WorldConfig) -> list[str]:
    """Up to MAX_RELATIONS true relations between objects that (colour, shape) names uniquely."""
    names = [(o["colour"], o["shape"]) for o in scene["objects"]]
    unique = [o for o, name in zip(scene["objects"], names) if names.count(name) == 1]
    pairs = [(a, b) for i, a in enumerate(unique) for b in unique[i + 1:]]  # each pair once
    sentences = []
    for k in rng.permutation(len(pairs))[:MAX_RELATIONS]:
        if rng.random() >= cfg.p_relation:
            continue
        a, b = pairs[k][::-1] if rng.random() < 0.5 else pairs[k]  # in either order
        true = _true_relations(a, b)  # never empty: two objects never share a cell
        sentences.append(_fill(RELATION_TEMPLATE, colour_a=a["colour"], shape_a=a["shape"],
                               rel=_pick(rng, true), colour_b=b["colour"], shape_b=b["shape"]))
    return sentences


def _n_words(sentences: list[str]) -> int:
    return sum(len(s.split()) for s in sentences)


def make_caption(scene: dict, rng: np.random.Generator, cfg: WorldConfig) -> str:
    """A random true caption: each object once, in random order and templates, optional count and
    relations. A fresh caption of an existing scene too, e.g. a new one every epoch."""
    objects = [scene["objects"][k] for k in rng.permutation(len(scene["objects"]))]
    body = [_object_sentence(o, rng) for o in objects]
    relations = _relation_sentences(scene, rng, cfg)
    count = [_count_sentence(len(objects), rng)] if rng.random() < cfg.p_count else []
    count_first = rng.random() < 0.5
    while _n_words(body + relations + count) > cfg.max_words and (relations or count):
        if relations:  # the optional sentences go, relations first, until the caption fits
            relations.pop()
        else:
            count = []
    for sentence in relations:  # relations go anywhere among the object sentences
        body.insert(int(rng.integers(len(body) + 1)), sentence)
    return " ".join(count + body if count_first else body + count)


def sample(split: str, index: int, cfg: WorldConfig | None = None) -> dict:
    """Example `index` of `split`: scene, image and caption, from the one rng of (split, index)."""
    cfg = cfg or WorldConfig()
    rng = scene_rng(split, index)
    scene = make_scene(rng, cfg)
    image = render(scene, rng, cfg)
    return dict(image=image, caption=make_caption(scene, rng, cfg), scene=scene, index=index)

# -------------------------------------------------------------------------------------------------
# Hallucination pairs (Section 3.2, ViCrit style): one attribute, count or position made false.


def hallucination_pair(scene: dict, caption: str, rng: np.random.Generator) -> dict | None:
    """dict(correct, wrong, span): `wrong` differs from `caption` only in words[span[0]:span[1]], by
    a same-slot value of as many words that makes its sentence's claim false; None if none does."""
    words = caption.split()
    options = []  # ((start, end) in the caption's words, false values), one per slot of a sentence
    for start, end in sentence_spans(words):
        _, slots = parse_sentence(words[start:end]) or (None, {})  # no slots: it does not parse
        for name, (value, s, e) in slots.items():
            if _slot_kind(name) == "rel":  # relation words are not among the hallucination kinds
                continue
            wrong = []
            for other in SLOT_VALUES[_slot_kind(name)]:
                if other == value or len(other.split()) != e - s:
                    continue
                sentence = words[start:start + s] + other.split() + words[start + e:end]
                reparsed = parse_sentence(sentence)
                if reparsed is not None and not claim_holds(reparsed[0], scene):
                    wrong.append(other)
            if wrong:
                options.append(((start + s, start + e), wrong))
    if not options:
        return None
    (s, e), wrong = _pick(rng, options)  # a slot first, so that positions do not dominate
    new_words = words[:s] + _pick(rng, wrong).split() + words[e:]
    return {"correct": caption, "wrong": " ".join(new_words), "span": (s, e)}
