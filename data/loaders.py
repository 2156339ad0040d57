"""data/loaders.py: real-data loaders: images from disk, LLaVA / ShareGPT4V conversation JSON (with
ReDiff's "revise" corrections), ViCrit-style pair JSONL and the ViCrit-Train JSON list.

Every problem with the data raises DataError, naming the file, the record (index or line), the
field and the fix. A loader returns (records: plain dicts, stats: {"skipped_missing": n,
"skipped_bad": n}, the examples left out by skip_missing / skip_bad). Images are only checked for
existence here (open_image decodes them). Image paths resolve under `image_root`; one leading out
of it ("../", an absolute path, a symlink) is a DataError, never skipped, unless allow_outside_root.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_TAG = "<image>"               # LLaVA's placeholder for the image inside the human turn
HUMAN_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")  # a turn's "from" values
VICRIT_TRAIN_FIELDS = ("original_caption", "changed_caption", "solution_original",
                       "solution_target")


class DataError(ValueError):
    """Bad input data: the message names the file, the record and field (or line), and the fix."""

# Images -------------------------------------------------------------------------------------------


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Pillow's convert() clips 16-bit and float values instead of
    scaling them (a 16-bit photo comes out almost all white): 16-bit grey (older Pillows say "I")
    is mapped from [0, 65535], float from [0, 1], onto [0, 255] first."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        top = 1.0 if im.mode == "F" else 65535.0
        grey = np.clip(np.asarray(im, dtype=np.float64), 0, top) * (255 / top)
        im = Image.fromarray(np.round(grey).astype(np.uint8))
    # an alpha channel, or ("transparency") a P, L or RGB image with a tRNS colour: on white
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # also makes a copy detached from the file


def open_image(path) -> Image.Image:
    """Read an image file as 8-bit RGB: grayscale, palette, CMYK, 16-bit and float images are
    converted, transparent ones composited on white. Missing, unreadable, non-image or truncated
    files raise DataError."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file; give the path of an image")
    if not path.is_file():
        raise DataError(f"{path}: image file not found; check the path (and its image root)")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later inside a batch
            return _to_rgb(im)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read; replace or remove it") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: the image is damaged or truncated ({e}); re-download or "
                        "re-encode it") from None

# Shared checks ------------------------------------------------------------------------------------


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


def _json_list(path: Path, what: str) -> list:
    """A UTF-8 JSON file whose top level is a list, or a DataError naming the problem."""
    try:
        data = json.loads(_decode_utf8(path.read_bytes(), path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
                        f"fix the file") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level must be a JSON list of {what}, "
                        f"got {type(data).__name__}; wrap the records in [...]")
    return data


def _examples(path: Path, numbered, unit: str, parse, image_root, skip_missing: bool,
              skip_bad: bool, allow_outside_root: bool, by_name: bool = False):
    """(records, stats) of `numbered`, (number, raw) pairs named f"{unit} {number}": the records
    that parse(raw, number, where) -> (relative image path, record) accepts, each with its
    "image_path" (root / relative, symlinks followed) after its "id". A DataError from parse is
    skipped with skip_bad, a missing image with skip_missing, counted in stats; an image outside
    the root is a DataError unless allow_outside_root. by_name: an image not at its path is looked
    for by its file name alone under the root."""
    root, records = Path(image_root).resolve(), []
    skip = {"skipped_missing": skip_missing, "skipped_bad": skip_bad}
    stats = dict.fromkeys(skip, 0)

    def skipped(kind: str, error: DataError) -> None:
        if not skip[kind]:
            raise error
        stats[kind] += 1

    def image(relative: str, where: str) -> Path:
        resolved = (root / relative).resolve()  # an absolute `relative` replaces root
        if not allow_outside_root and not resolved.is_relative_to(root):
            raise DataError(f"{path}: {where}: field 'image' {relative!r} resolves to {resolved}, "
                            f"outside the image root {root}; fix the path, or pass "
                            "allow_outside_root=True if this is intended")
        return resolved

    for number, raw in numbered:
        where = f"{unit} {number}"
        try:
            relative, record = parse(raw, number, where)
        except DataError as e:
            skipped("skipped_bad", e)
            continue
        found = image(relative, where)
        if by_name and not found.is_file():
            found = image(Path(relative).name, where)
        if found.is_file():
            records.append({"id": record.pop("id"), "image_path": str(found), **record})
        else:
            skipped("skipped_missing", DataError(
                f"{path}: {where}: image file {found} not found; fix the path or image root, or "
                "pass skip_missing=True to skip (and count) such examples"))
    return records, stats

# LLaVA / ShareGPT4V conversation JSON -------------------------------------------------------------


def _first_turns(record: dict, where: str, path: Path) -> tuple[str, str]:
    """(first human turn, first assistant turn after it) of record["conversations"]."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        problem = "is missing" if "conversations" not in record else "must be a list of turns"
        raise DataError(f"{path}: {where}: field 'conversations' {problem}; fix or remove it")
    prompt = None
    for k, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        if prompt is None and role in HUMAN_ROLES:
            prompt = _field(turn, "value", f"{where}, conversations[{k}]", path)
        elif prompt is not None and role in ASSISTANT_ROLES:
            return prompt, _field(turn, "value", f"{where}, conversations[{k}]", path)
    raise DataError(f"{path}: {where}: field 'conversations' needs a turn from one of "
                    f"{HUMAN_ROLES} followed by one from {ASSISTANT_ROLES}; fix or remove it")


def load_llava_json(json_path, image_root, skip_missing: bool = False, skip_bad: bool = False,
                    allow_outside_root: bool = False) -> tuple[list[dict], dict]:
    """Read a LLaVA / ShareGPT4V conversation file: a JSON list of {"id", "image", "conversations":
    [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}.

    Each record is {"id" (default: the index), "image_path", "prompt" (the first human turn without
    its "<image>" tag), "caption" (the first assistant turn after it)}. A record of ReDiff's own
    data with a "revise" list of {"org", "target"} corrections holds a wrong answer (a
    hallucinated caption or a model's draft): it also gets "wrong" (the assistant turn as
    written), "revise" (the pairs), and "caption" is the turn with the corrections applied. A
    file that is not UTF-8, not valid JSON or not a list is always a DataError."""
    path = Path(json_path)

    def parse(record, index: int, where: str) -> tuple[str, dict]:
        if isinstance(record, dict) and "conversations" not in record and all(
                name in record for name in VICRIT_TRAIN_FIELDS):
            raise DataError(f"{path}: {where}: a ViCrit-Train record with no 'conversations'; "
                            "read this file with load_vicrit_train (--vicrit-train-json)")
        relative = _field(record, "image", where, path)
        prompt, caption = _first_turns(record, where, path)
        out = {"id": str(record.get("id", index)), "prompt": prompt.replace(IMAGE_TAG, "").strip(),
               "caption": caption.strip()}
        if "revise" in record:
            corrected, pairs = _revised(record["revise"], out["caption"], where, path)
            out.update(wrong=out["caption"], caption=corrected, revise=pairs)
        return relative, out

    return _examples(path, enumerate(_json_list(path, "conversation records")), "record", parse,
                     image_root, skip_missing, skip_bad, allow_outside_root)


def _revised(pairs, answer: str, where: str, path: Path) -> tuple[str, list[dict]]:
    """ReDiff's "revise" corrections of an answer (its hallucinated caption, Stage I, or the
    model's draft, Stage II) -> (the corrected answer, the pairs): each org, which must occur in
    the answer, is replaced by its target at its first occurrence, one pair after the other."""
    if not isinstance(pairs, list) or not pairs:
        raise DataError(f"{path}: {where}: field 'revise' must be a non-empty list of "
                        f"{{\"org\", \"target\"}} objects, got {pairs!r:.60}; fix or remove it")
    for k, pair in enumerate(pairs):
        here = f"{where}, revise[{k}]"
        org, target = _field(pair, "org", here, path), _field(pair, "target", here, path)
        if org == target:
            raise DataError(f"{path}: {here}: 'org' equals 'target' ({org!r:.60}); a correction "
                            f"must change the text; fix or remove this pair")
        if org not in answer:
            raise DataError(f"{path}: {here}: 'org' {org!r:.60} does not occur in the assistant "
                            f"turn, which must hold the wrong text; fix or remove this record")
        answer = answer.replace(org, target, 1)
    return answer, [{"org": p["org"], "target": p["target"]} for p in pairs]

# ViCrit-style hallucination pairs (JSONL) ---------------------------------------------------------


def _pair(record, where: str, path: Path) -> dict:
    """{"caption", "wrong", "span"} of one JSONL record, checked."""
    caption = _field(record, "caption", where, path)
    names = [name for name in ("hallucinated", "wrong") if name in record]
    if len(names) != 1:
        raise DataError(f"{path}: {where}: give the corrupted caption in exactly one of the fields "
                        f"'hallucinated' or 'wrong' (found {names or 'neither'}); fix it")
    wrong = _field(record, names[0], where, path)
    words, wrong_words = caption.split(), wrong.split()
    if len(words) != len(wrong_words):
        raise DataError(f"{path}: {where}: field '{names[0]}' has {len(wrong_words)} words but "
                        f"'caption' has {len(words)}; a pair must differ by substitution only")
    differ = [i for i, (a, b) in enumerate(zip(words, wrong_words)) if a != b]
    if not differ:
        raise DataError(f"{path}: {where}: field '{names[0]}' equals 'caption'; a pair needs one "
                        "corrupted span")
    span = record.get("span", [differ[0], differ[-1] + 1])  # default: the differing words
    if not (isinstance(span, list) and len(span) == 2 and all(type(i) is int for i in span)
            and 0 <= span[0] <= differ[0] and differ[-1] < span[1] <= len(words)):
        raise DataError(f"{path}: {where}: field 'span' {span!r:.60} must be [start, end] word "
                        f"indices covering the differing words {[differ[0], differ[-1] + 1]} "
                        f"within {len(words)} words; fix it or leave it out")
    return {"caption": caption, "wrong": wrong, "span": (span[0], span[1])}


def load_vicrit_jsonl(jsonl_path, image_root, skip_missing: bool = False, skip_bad: bool = False,
                      allow_outside_root: bool = False) -> tuple[list[dict], dict]:
    """Read ViCrit-style pairs: one JSON object per line, {"image", "caption" (correct),
    "hallucinated" or "wrong" (a copy with one span of words replaced), optional "span": [start,
    end), optional "id"}. Words are whitespace-separated; both captions have as many.

    Each record is {"id" (default: "line N"), "image_path", "caption", "wrong", "span": (start,
    end)}: the span given, or the words that differ. A bad line (not UTF-8, not JSON, blank, torn
    by an interrupted write, failing the checks) is a DataError naming the line, or with
    skip_bad=True skipped and counted."""
    path = Path(jsonl_path)
    data = path.read_bytes()
    lines = data.removesuffix(b"\n").split(b"\n") if data else []  # a last "\n" ends the last line

    def parse(raw: bytes, number: int, where: str) -> tuple[str, dict]:
        text = _decode_utf8(raw, path, number)
        if not text.strip():
            raise DataError(f"{path}: {where} is blank; remove it (one JSON object per line)")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            torn = (" (the last line: probably cut off by an interrupted write)"
                    if number == len(lines) else "")
            raise DataError(f"{path}: {where}{torn} is not valid JSON ({e.msg}, column {e.colno}); "
                            "fix or remove the line, or pass skip_bad=True to skip such lines"
                            ) from None
        relative = _field(record, "image", where, path)
        return relative, {"id": str(record.get("id", where)), **_pair(record, where, path)}

    return _examples(path, enumerate(lines, start=1), "line", parse, image_root, skip_missing,
                     skip_bad, allow_outside_root)

# ViCrit-Train (the ViCrit authors' JSON list; ReDiff's Stage I hallucination pairs come from it) --


def load_vicrit_train(json_path, image_root, skip_missing: bool = False, skip_bad: bool = False,
                      allow_outside_root: bool = False) -> tuple[list[dict], dict]:
    """Read ViCrit-Train as released: a JSON list of {"image" or "image_path", "problem" (the
    question), "original_caption", "changed_caption" (one phrase replaced), "solution_original"
    (that phrase as it was), "solution_target" (the phrase that replaced it)}.

    Each record is {"id" (the index), "image_path", "prompt", "caption" (original_caption),
    "wrong" (changed_caption), "solutions": [solution_original, solution_target]}. An image not
    at its path is looked for by its file name under image_root (ReDiff keeps the ViCrit images
    in one folder). Token counts are checked by the caller (data.captions.CaptionData)."""
    path = Path(json_path)

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

    return _examples(path, enumerate(_json_list(path, "ViCrit-Train records")), "record", parse,
                     image_root, skip_missing, skip_bad, allow_outside_root, by_name=True)
