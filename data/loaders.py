"""data/loaders.py: real-data loaders: images from disk, LLaVA / ShareGPT4V conversation JSON (with
ReDiff's "revise" corrections), ViCrit-style pair JSONL and the ViCrit-Train JSON list.

Every problem with the data raises DataError, whose message names the file, the record (index or
line) and field, and the fix. The dataset loaders return `(records, stats)`:

    records   list of plain dicts, one per usable example (keys listed in each loader's docstring)
    stats     {"skipped_missing": n, "skipped_bad": n}: examples left out by skip_missing / skip_bad

Image files are checked for existence here; they are decoded later, by open_image, when a batch
needs them. Image paths in the data are resolved under `image_root`; a path that leads outside it
("../", an absolute path elsewhere, a symlink pointing out) is always a DataError (never skipped)
unless allow_outside_root=True.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_TAG = "<image>"               # LLaVA's placeholder for the image inside the human turn
HUMAN_ROLES = ("human", "user")     # values of a turn's "from" field
ASSISTANT_ROLES = ("gpt", "assistant")
REVISE_FIELD = "revise"             # ReDiff's records: [{"org": wrong text, "target": correction}]
VICRIT_TRAIN_FIELDS = ("original_caption", "changed_caption", "solution_original",
                       "solution_target")
WHITE = (255, 255, 255, 255)        # transparent pixels are shown on opaque white
UINT16_TO_UINT8 = 257               # 65535 / 255: maps the 16-bit range exactly onto the 8-bit one
FLOAT_TO_UINT8 = 255                # float images are taken to be in [0, 1]


class DataError(ValueError):
    """Bad input data: the message names the file, the record and field (or line), and the fix."""


# -------------------------------------------------------------------------------------------------
# Images


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Pillow's convert() clips 16-bit and float values instead of
    scaling them (a 16-bit photo comes out almost all white): those are rescaled here first."""
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit grey; older Pillows say "I"
        grey = np.clip(np.asarray(im, dtype=np.float64), 0, UINT16_TO_UINT8 * 255) / UINT16_TO_UINT8
        im = Image.fromarray(np.round(grey).astype(np.uint8))
    elif im.mode == "F":
        grey = np.clip(np.asarray(im, dtype=np.float64), 0, 1) * FLOAT_TO_UINT8
        im = Image.fromarray(np.round(grey).astype(np.uint8))
    # an alpha channel, or ("transparency") a P, L or RGB image with a tRNS colour
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return im.convert("RGB")  # also makes a copy detached from the file


def open_image(path) -> Image.Image:
    """Read an image file as 8-bit RGB: grayscale, palette, CMYK, 16-bit and float images are
    converted, transparent ones composited on white. Missing, unreadable, non-image or truncated
    files raise DataError."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file; give the path of an image")
    if not path.is_file():
        raise DataError(f"{path}: image file not found; check the path (and the image root it is "
                        "relative to)")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later inside a batch
            return _to_rgb(im)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read; replace the file or remove it from "
                        "the data") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: the image is damaged or truncated ({e}); re-download or "
                        "re-encode it") from None


# -------------------------------------------------------------------------------------------------
# Shared checks


def _decode_utf8(data: bytes, path: Path, line: int | None = None) -> str:
    """bytes -> str, or a DataError naming the first bad byte's offset (in the file or line)."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line_in_file = data.count(b"\n", 0, e.start) + 1
        where = (f"line {line}, byte {e.start} of the line" if line
                 else f"byte offset {e.start} (line {line_in_file})")
        raise DataError(f"{path}: {where}: byte 0x{data[e.start]:02x} is not valid UTF-8; the file "
                        "must be UTF-8 (convert it, e.g. `iconv -f latin1 -t utf-8 in > out`)"
                        ) from None


def _field(record, name: str, where: str, path: Path) -> str:
    """record[name] as a non-empty string, or a DataError naming the record and field."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}; "
                        "fix or remove it")
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        problem = ("is missing" if name not in record
                   else f"must be a non-empty string, got {value!r:.60}")
        raise DataError(f"{path}: {where}: field '{name}' {problem}; fix or remove this record")
    return value


class _Source:
    """A data file being read: its path, the image root, and the skipping asked for, counted in
    `stats`: skip_missing for examples whose image is missing, skip_bad for malformed ones."""

    def __init__(self, path, image_root, skip_missing: bool, skip_bad: bool,
                 allow_outside_root: bool):
        self.path, self.root = Path(path), Path(image_root)
        self.allow_outside_root = allow_outside_root
        self.skip = {"skipped_missing": skip_missing, "skipped_bad": skip_bad}
        self.stats = {name: 0 for name in self.skip}

    def skipped(self, kind: str, error: DataError) -> None:
        """Count a skipped example, or raise when skipping that kind was not asked for."""
        if not self.skip[kind]:
            raise error
        self.stats[kind] += 1

    def image(self, relative: str, where: str) -> Path:
        """root / relative, symlinks followed; a DataError outside the root (unless allowed)."""
        resolved = (self.root / relative).resolve()  # an absolute `relative` replaces root
        if not self.allow_outside_root and not resolved.is_relative_to(self.root.resolve()):
            raise DataError(f"{self.path}: {where}: field 'image' {relative!r} resolves to "
                            f"{resolved}, outside the image root {self.root.resolve()}; fix the "
                            "path, or pass allow_outside_root=True if this is intended")
        return resolved

    def records(self, numbered, unit: str, parse, by_name: bool = False) -> list[dict]:
        """The examples of `numbered`, (number, raw) pairs named f"{unit} {number}", that
        parse(raw, number, where) -> (relative image path, record) accepts and whose image exists,
        each record with its "image_path" after its "id". A DataError from parse is skipped with
        skip_bad, a missing image with skip_missing. by_name: an image that is not at its path is
        looked for by its file name alone under the image root."""
        records = []
        for number, raw in numbered:
            where = f"{unit} {number}"
            try:
                relative, record = parse(raw, number, where)
            except DataError as e:
                self.skipped("skipped_bad", e)
                continue
            image = self.image(relative, where)
            if by_name and not image.is_file():
                image = self.image(Path(relative).name, where)
            if image.is_file():
                records.append({"id": record.pop("id"), "image_path": str(image), **record})
            else:
                self.skipped("skipped_missing", DataError(
                    f"{self.path}: {where}: image file {image} not found; fix the path or image "
                    "root, or pass skip_missing=True to skip (and count) such examples"))
        return records


def _json_list(path: Path, what: str) -> list:
    """A UTF-8 JSON file whose top level is a list, or a DataError naming the problem."""
    text = _decode_utf8(path.read_bytes(), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
                        f"fix the file") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level must be a JSON list of {what}, "
                        f"got {type(data).__name__}; wrap the records in [...]")
    return data


# -------------------------------------------------------------------------------------------------
# LLaVA / ShareGPT4V conversation JSON


def _first_turns(record: dict, where: str, path: Path) -> tuple[str, str]:
    """(first human turn, first assistant turn after it) of record["conversations"]."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        problem = "is missing" if "conversations" not in record else "must be a list of turns"
        raise DataError(f"{path}: {where}: field 'conversations' {problem}; fix or remove this "
                        "record")
    prompt = None
    for k, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        if prompt is None and role in HUMAN_ROLES:
            prompt = _field(turn, "value", f"{where}, conversations[{k}]", path)
        elif prompt is not None and role in ASSISTANT_ROLES:
            return prompt, _field(turn, "value", f"{where}, conversations[{k}]", path)
    raise DataError(f"{path}: {where}: field 'conversations' needs a turn from one of "
                    f"{HUMAN_ROLES} followed by one from {ASSISTANT_ROLES}; fix or remove this "
                    "record")


def load_llava_json(json_path, image_root, skip_missing: bool = False, skip_bad: bool = False,
                    allow_outside_root: bool = False) -> tuple[list[dict], dict]:
    """Read a LLaVA / ShareGPT4V conversation file: a JSON list of {"id", "image", "conversations":
    [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}.

    Returns (records, stats). Each record is {"id", "image_path", "prompt", "caption"}: the first
    human turn without its "<image>" tag, and the first assistant turn after it ("id" defaults to
    the record's index). A record of ReDiff's own data with a "revise" list of {"org", "target"}
    corrections holds a wrong answer (a hallucinated caption or a model's draft): its record gets
    "wrong" (the assistant turn as written), "caption" (the turn with the corrections applied) and
    "revise" (the pairs). A missing image is a DataError, or with skip_missing=True skipped and
    counted; a malformed record likewise with skip_bad=True. A file that is not UTF-8, not valid
    JSON or not a list is always a DataError."""
    source = _Source(json_path, image_root, skip_missing, skip_bad, allow_outside_root)
    path = source.path

    def parse(record, index: int, where: str) -> tuple[str, dict]:
        if isinstance(record, dict) and "conversations" not in record and all(
                name in record for name in VICRIT_TRAIN_FIELDS):
            fields = ", ".join(VICRIT_TRAIN_FIELDS)
            raise DataError(f"{path}: {where}: a ViCrit-Train record (fields {fields}), not a "
                            "conversation; read this file with load_vicrit_train "
                            "(--vicrit-train-json)")
        relative = _field(record, "image", where, path)
        prompt, caption = _first_turns(record, where, path)
        out = {"id": str(record.get("id", index)), "prompt": prompt.replace(IMAGE_TAG, "").strip(),
               "caption": caption.strip()}
        if REVISE_FIELD in record:
            corrected, pairs = _revised(record, caption, where, path)
            out.update(wrong=out["caption"], caption=corrected, revise=pairs)
        return relative, out

    data = _json_list(path, "conversation records")
    return source.records(enumerate(data), "record", parse), source.stats


def _revised(record: dict, answer: str, where: str, path: Path) -> tuple[str, list[dict]]:
    """ReDiff's "revise" corrections of an answer (its hallucinated caption, Stage I, or the
    model's draft, Stage II) -> (the corrected answer, the pairs): each org, which must occur in
    the answer, is replaced by its target at its first occurrence, one pair after the other."""
    pairs = record[REVISE_FIELD]
    if not isinstance(pairs, list) or not pairs:
        raise DataError(f"{path}: {where}: field '{REVISE_FIELD}' must be a non-empty list of "
                        f"{{\"org\", \"target\"}} objects, got {pairs!r:.60}; fix or remove this "
                        f"record")
    corrected = answer.strip()
    for k, pair in enumerate(pairs):
        here = f"{where}, {REVISE_FIELD}[{k}]"
        org, target = _field(pair, "org", here, path), _field(pair, "target", here, path)
        if org == target:
            raise DataError(f"{path}: {here}: 'org' equals 'target' ({org!r:.60}); a correction "
                            f"must change the text; fix or remove this pair")
        if org not in corrected:
            raise DataError(f"{path}: {here}: 'org' {org!r:.60} does not occur in the assistant "
                            f"turn; the assistant turn must hold the wrong text and 'revise' its "
                            f"corrections; fix or remove this record")
        corrected = corrected.replace(org, target, 1)
    return corrected, [{"org": p["org"], "target": p["target"]} for p in pairs]


# -------------------------------------------------------------------------------------------------
# ViCrit-style hallucination pairs (JSONL)


def _pair(record, where: str, path: Path) -> tuple[str, str, tuple[int, int]]:
    """(caption, wrong, span) of one JSONL record, checked."""
    caption = _field(record, "caption", where, path)
    names = [name for name in ("hallucinated", "wrong") if name in record]
    if len(names) != 1:
        raise DataError(f"{path}: {where}: give the corrupted caption in exactly one of the fields "
                        f"'hallucinated' or 'wrong' (found {names or 'neither'}); fix or remove "
                        "this record")
    wrong = _field(record, names[0], where, path)
    words, wrong_words = caption.split(), wrong.split()
    if len(words) != len(wrong_words):
        raise DataError(f"{path}: {where}: field '{names[0]}' has {len(wrong_words)} words but "
                        f"'caption' has {len(words)}; a pair must differ by substitution only, "
                        "with equal word counts")
    differ = [i for i, (a, b) in enumerate(zip(words, wrong_words)) if a != b]
    if not differ:
        raise DataError(f"{path}: {where}: field '{names[0]}' equals 'caption'; a pair needs one "
                        "corrupted span")
    differ = (differ[0], differ[-1] + 1)  # the differing words, [first, last + 1)
    if "span" not in record:
        return caption, wrong, differ
    span = record["span"]
    valid = (isinstance(span, list) and len(span) == 2 and all(type(i) is int for i in span)
             and 0 <= span[0] <= differ[0] and differ[1] <= span[1] <= len(words))
    if not valid:
        raise DataError(f"{path}: {where}: field 'span' {span!r:.60} must be [start, end] word "
                        f"indices covering the differing words {list(differ)} within {len(words)} "
                        "words; fix it or leave it out")
    return caption, wrong, (span[0], span[1])


def load_vicrit_jsonl(jsonl_path, image_root, skip_missing: bool = False, skip_bad: bool = False,
                      allow_outside_root: bool = False) -> tuple[list[dict], dict]:
    """Read ViCrit-style pairs: one JSON object per line, {"image", "caption" (correct),
    "hallucinated" or "wrong" (a copy with one span of words replaced), optional "span": [start,
    end), optional "id"}.

    Words are whitespace-separated; the two captions must have equal word counts. Returns (records,
    stats). Each record is {"id", "image_path", "caption", "wrong", "span": (start, end)}: the span
    is given, or computed as the words that differ ("id" defaults to "line N"). A bad line (not
    UTF-8, not JSON, blank, torn by an interrupted write, failing the checks) is a DataError naming
    the line, or with skip_bad=True skipped and counted; a missing image likewise with
    skip_missing=True."""
    source = _Source(jsonl_path, image_root, skip_missing, skip_bad, allow_outside_root)
    path = source.path
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last line

    def parse(raw: bytes, number: int, where: str) -> tuple[str, dict]:
        text = _decode_utf8(raw, path, number)
        if not text.strip():
            raise DataError(f"{path}: {where} is blank; remove it (every line must hold one JSON "
                            "object)")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            last = number == len(lines)
            torn = " (the last line: probably cut off by an interrupted write)" if last else ""
            raise DataError(f"{path}: {where}{torn} is not valid JSON ({e.msg}, column {e.colno}); "
                            "fix or remove the line, or pass skip_bad=True to skip such lines"
                            ) from None
        relative = _field(record, "image", where, path)
        caption, wrong, span = _pair(record, where, path)
        return relative, {"id": str(record.get("id", where)), "caption": caption, "wrong": wrong,
                          "span": span}

    return source.records(enumerate(lines, start=1), "line", parse), source.stats


# -------------------------------------------------------------------------------------------------
# ViCrit-Train (the ViCrit authors' JSON list; ReDiff's Stage I hallucination pairs come from it)


def load_vicrit_train(json_path, image_root, skip_missing: bool = False, skip_bad: bool = False,
                      allow_outside_root: bool = False) -> tuple[list[dict], dict]:
    """Read ViCrit-Train as released: a JSON list of {"image" or "image_path", "problem" (the
    question), "original_caption", "changed_caption" (one phrase replaced), "solution_original"
    (that phrase as it was), "solution_target" (the phrase that replaced it)}.

    Returns (records, stats). Each record is {"id" (the index), "image_path", "prompt", "caption"
    (original_caption), "wrong" (changed_caption), "solutions": [solution_original,
    solution_target]}. The image path is taken under image_root, and when no file is there, its
    last component (ReDiff keeps the ViCrit images in one folder). Token counts are not checked
    here: the caller keeps a pair when both captions, and both solutions, have as many tokens under
    the model's tokenizer (data.captions.CaptionData). Errors and skipping as load_llava_json."""
    source = _Source(json_path, image_root, skip_missing, skip_bad, allow_outside_root)
    path = source.path

    def parse(record, index: int, where: str) -> tuple[str, dict]:
        names = [n for n in ("image", "image_path") if isinstance(record, dict) and n in record]
        relative = _field(record, names[0] if names else "image", where, path)
        original, changed, solution, target = (_field(record, n, where, path)
                                               for n in VICRIT_TRAIN_FIELDS)
        if original == changed:
            raise DataError(f"{path}: {where}: 'changed_caption' equals 'original_caption'; a pair "
                            "needs one changed phrase; fix or remove this record")
        problem = record.get("problem") or ""
        if not isinstance(problem, str):
            raise DataError(f"{path}: {where}: field 'problem' must be a string, got "
                            f"{problem!r:.60}; fix or remove this record")
        return relative, {"id": str(index), "prompt": problem.replace(IMAGE_TAG, "").strip(),
                          "caption": original.strip(), "wrong": changed.strip(),
                          "solutions": [solution.strip(), target.strip()]}

    data = _json_list(path, "ViCrit-Train records")
    return source.records(enumerate(data), "record", parse, by_name=True), source.stats
