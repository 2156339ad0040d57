"""tests/test_loaders.py: images of every kind, LLaVA conversation JSON (with ReDiff's "revise"
corrections), ViCrit pair JSONL and the ViCrit-Train JSON list, good and bad."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from data.loaders import DataError, load_llava_json, load_vicrit_jsonl, load_vicrit_train, open_image

SIZE = (12, 8)  # width, height of the test images
RED, GREEN = (255, 0, 0), (0, 255, 0)


# ----------------------------------------------------------------------------------------------------------------
# Images


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_rgb_png_and_jpeg_load_unchanged_in_size(tmp_path):
    for name in ("a.png", "a.jpg"):
        im = open_image(save(Image.new("RGB", SIZE, RED), tmp_path / name))
        assert im.mode == "RGB" and im.size == SIZE
        assert np.abs(np.asarray(im, dtype=int) - RED).max() <= 2  # JPEG is lossy


def test_grayscale_palette_and_cmyk_become_rgb(tmp_path):
    assert open_image(save(Image.new("L", SIZE, 100), tmp_path / "grey.png")).getpixel((0, 0)) == (100, 100, 100)
    palette = Image.new("RGB", SIZE, GREEN).convert("P")
    assert open_image(save(palette, tmp_path / "palette.png")).getpixel((3, 3)) == GREEN
    assert open_image(save(Image.new("1", SIZE, 1), tmp_path / "bw.png")).getpixel((0, 0)) == (255, 255, 255)
    cmyk = open_image(save(Image.new("CMYK", SIZE, (0, 255, 255, 0)), tmp_path / "cmyk.jpg"))
    assert cmyk.mode == "RGB" and np.abs(np.subtract(cmyk.getpixel((0, 0)), RED)).max() <= 2


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", SIZE, (0, 0, 0, 0))         # fully transparent black
    rgba.putpixel((1, 1), RED + (255,))                   # one opaque red pixel
    rgba.putpixel((2, 2), (0, 0, 0, 128))                 # half-transparent black
    im = open_image(save(rgba, tmp_path / "rgba.png"))
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 1)) == RED
    assert all(126 <= c <= 128 for c in im.getpixel((2, 2)))
    la = open_image(save(Image.new("LA", SIZE, (0, 0)), tmp_path / "la.png"))
    assert la.getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", SIZE, 0)
    palette.putpalette([0, 0, 0] * 256)
    assert open_image(save(palette, tmp_path / "p.png", transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, SIZE[0] * SIZE[1]).round().astype(np.uint16).reshape(SIZE[1], SIZE[0])
    path = save(Image.fromarray(ramp), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    im = np.asarray(open_image(path), dtype=int)
    assert im.shape == (SIZE[1], SIZE[0], 3)
    assert im[0, 0, 0] == 0 and im[-1, -1, 0] == 255
    assert np.abs(im[..., 0] - ramp / 257).max() <= 1  # the whole range, not a white image
    assert (im[..., 0] == im[..., 1]).all() and (im[..., 1] == im[..., 2]).all()
    mid = Image.fromarray(np.full((4, 4), 32768, dtype=np.int32), mode="I")  # 32-bit "I", as older Pillows open them
    assert open_image(save(mid, tmp_path / "deep.tif")).getpixel((0, 0)) == (128, 128, 128)


def test_missing_non_image_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nowhere.png.*not found"):
        open_image(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="is a folder"):
        open_image(tmp_path)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png: not an image"):
        open_image(tmp_path / "text.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for name in ("cut.png", "cut.jpg"):
        data = save(noise, tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:len(data) // 2])
        with pytest.raises(DataError, match=f"{name}: .*truncated"):
            open_image(str(tmp_path / name))
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------------------------------------------
# LLaVA / ShareGPT4V JSON


def conversation(image, caption="a red square on white .", prompt="<image>\nDescribe the image briefly.", **extra):
    return {"id": "x", "image": image, **extra,
            "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}]}


@pytest.fixture
def root(tmp_path):
    """An image root with a JPEG, a grayscale PNG, an RGBA PNG and a 16-bit PNG, and a picture just outside it."""
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    save(Image.new("RGB", SIZE, RED), root / "coco" / "red.jpg")
    save(Image.new("L", SIZE, 50), root / "grey.png")
    save(Image.new("RGBA", SIZE, (0, 0, 255, 255)), root / "rgba.png")
    save(Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)), root / "deep.png")
    save(Image.new("RGB", SIZE, GREEN), tmp_path / "outside.png")
    return root


def write_json(path, data):
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def test_llava_json_gives_prompt_caption_and_readable_images(root, tmp_path):
    data = [conversation("coco/red.jpg", id=0),
            conversation("grey.png", prompt="What is this?\n<image>", caption="  grey.  "),
            {"id": "sharegpt4v", "image": "rgba.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "blue ."},
                {"from": "human", "value": "More?"}, {"from": "gpt", "value": "no ."}]},
            conversation("deep.png")]
    records, stats = load_llava_json(write_json(tmp_path / "llava.json", data), root)
    assert stats == {"skipped_missing": 0, "skipped_bad": 0}
    assert [r["id"] for r in records] == ["0", "x", "sharegpt4v", "x"]
    assert records[0] == {"id": "0", "image_path": str((root / "coco" / "red.jpg").resolve()),
                          "prompt": "Describe the image briefly.", "caption": "a red square on white ."}
    assert (records[1]["prompt"], records[1]["caption"]) == ("What is this?", "grey.")
    assert (records[2]["prompt"], records[2]["caption"]) == ("Describe it.", "blue .")  # first turns only
    for r in records:
        assert open_image(r["image_path"]).mode == "RGB"


def test_llava_missing_image_is_an_error_or_skipped_and_counted(root, tmp_path):
    path = write_json(tmp_path / "llava.json", [conversation("grey.png"), conversation("coco/gone.jpg")])
    with pytest.raises(DataError, match=r"llava.json: record 1: image file .*gone.jpg not found.*skip_missing"):
        load_llava_json(path, root)
    records, stats = load_llava_json(path, root, skip_missing=True)
    assert len(records) == 1 and stats["skipped_missing"] == 1


def test_llava_paths_escaping_the_root_are_refused_unless_allowed(root, tmp_path):
    os.symlink(tmp_path / "outside.png", root / "link.png")
    for image in ("../outside.png", str(tmp_path / "outside.png"), "coco/../../outside.png", "link.png"):
        path = write_json(tmp_path / "llava.json", [conversation(image)])
        with pytest.raises(DataError, match="record 0: field 'image'.*outside the image root.*allow_outside_root"):
            load_llava_json(path, root)
        with pytest.raises(DataError, match="outside the image root"):  # not skippable: it is a safety check
            load_llava_json(path, root, skip_missing=True, skip_bad=True)
        records, _ = load_llava_json(path, root, allow_outside_root=True)
        assert open_image(records[0]["image_path"]).getpixel((0, 0)) == GREEN
    inside = write_json(tmp_path / "llava.json", [conversation("coco/../grey.png")])
    assert load_llava_json(inside, root)[0][0]["image_path"] == str((root / "grey.png").resolve())


def test_llava_non_utf8_bytes_name_the_byte_offset(root, tmp_path):
    text = json.dumps([conversation("grey.png", caption="a café")], ensure_ascii=False)
    data = text.encode("latin-1")  # "é" becomes the lone byte 0xe9
    (tmp_path / "latin1.json").write_bytes(data)
    with pytest.raises(DataError, match=f"latin1.json: byte offset {data.index(0xe9)} .*0xe9.*must be UTF-8"):
        load_llava_json(tmp_path / "latin1.json", root)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # a byte-order mark is fine
    assert load_llava_json(tmp_path / "bom.json", root)[0][0]["caption"] == "a café"
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + data)  # the offset still counts from the file's start
    with pytest.raises(DataError, match=f"byte offset {data.index(0xe9) + 3} "):
        load_llava_json(tmp_path / "bom.json", root)


def test_llava_malformed_json_and_wrong_top_level(root, tmp_path):
    (tmp_path / "bad.json").write_text('[\n {"id": "a",\n  "image": "grey.png" "conversations": []}\n]')
    with pytest.raises(DataError, match="bad.json: malformed JSON at line 3, column"):
        load_llava_json(tmp_path / "bad.json", root)
    with pytest.raises(DataError, match="top level must be a JSON list.*got dict"):
        load_llava_json(write_json(tmp_path / "dict.json", {"data": []}), root)
    assert load_llava_json(write_json(tmp_path / "empty.json", []), root) == ([], {"skipped_missing": 0,
                                                                                "skipped_bad": 0})


@pytest.mark.parametrize("record, message", [
    ({"id": "a", "conversations": []}, "record 1: field 'image' is missing"),
    ({"image": "grey.png"}, "record 1: field 'conversations' is missing"),
    ({"image": "grey.png", "conversations": "hi"}, "record 1: field 'conversations' must be a list"),
    ({"image": "grey.png", "conversations": [{"from": "human", "value": "hi"}]}, "record 1: .*followed by one"),
    ({"image": "grey.png", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
     r"record 1, conversations\[0\]: field 'value' is missing"),
    (conversation("grey.png", caption="   "), r"record 1, conversations\[1\]: field 'value' must be a non-empty"),
    (conversation(["grey.png"]), "record 1: field 'image' must be a non-empty string"),
    ("just text", "record 1: expected a JSON object")])
def test_llava_bad_records_name_index_and_field(root, tmp_path, record, message):
    path = write_json(tmp_path / "llava.json", [conversation("grey.png"), record])
    with pytest.raises(DataError, match=message):
        load_llava_json(path, root)
    records, stats = load_llava_json(path, root, skip_bad=True)
    assert len(records) == 1 and stats == {"skipped_missing": 0, "skipped_bad": 1}


def test_revise_records_give_the_corrected_caption_and_keep_the_wrong_one(root, tmp_path):
    """ReDiff's released records: the assistant turn is wrong, "revise" holds the corrections."""
    revise = [{"org": "blue", "target": "red"}, {"org": "two cats", "target": "one dog"}]
    data = [conversation("grey.png", caption="a blue ball and two cats, blue sky .", revise=revise),
            conversation("grey.png")]
    records, _ = load_llava_json(write_json(tmp_path / "rediff.json", data), root)
    assert records[0]["wrong"] == "a blue ball and two cats, blue sky ."
    assert records[0]["caption"] == "a red ball and one dog, blue sky ."  # the first occurrence only
    assert records[0]["revise"] == revise
    assert "wrong" not in records[1] and "revise" not in records[1]


@pytest.mark.parametrize("revise, message", [
    ([], r"record 1: field 'revise' must be a non-empty list"),
    ({"org": "blue", "target": "red"}, r"record 1: field 'revise' must be a non-empty list"),
    ([{"org": "green", "target": "red"}], r"record 1, revise\[0\]: 'org' 'green' does not occur"),
    ([{"org": "blue", "target": "red"}, {"org": "ball"}], r"record 1, revise\[1\]: field 'target' is missing"),
    ([{"org": "blue", "target": "blue"}], r"record 1, revise\[0\]: 'org' equals 'target'"),
    (["blue -> red"], r"record 1, revise\[0\]: expected a JSON object")])
def test_revise_records_of_unknown_shape_are_refused(root, tmp_path, revise, message):
    data = [conversation("grey.png"), conversation("grey.png", caption="a blue ball .", revise=revise)]
    path = write_json(tmp_path / "rediff.json", data)
    with pytest.raises(DataError, match="rediff.json: " + message):
        load_llava_json(path, root)
    records, stats = load_llava_json(path, root, skip_bad=True)
    assert len(records) == 1 and stats["skipped_bad"] == 1


# ----------------------------------------------------------------------------------------------------------------
# ViCrit-Train JSON list


def vicrit_train(image="grey.png", original="a small red circle at the top .",
                 changed="a small blue circle at the top .", **extra):
    return {"image": image, "problem": "<image>\nDescribe the image.", "original_caption": original,
            "changed_caption": changed, "solution_original": "red", "solution_target": "blue", **extra}


def test_vicrit_train_list_gives_pairs_with_their_solutions(root, tmp_path):
    second = vicrit_train(image="coco/red.jpg", original="A red car.", changed="A green car.")
    second["image_path"] = second.pop("image")  # the Hugging Face copy names the field image_path
    data = [vicrit_train(), second]
    records, stats = load_vicrit_train(write_json(tmp_path / "vicrit_train.json", data), root)
    assert stats == {"skipped_missing": 0, "skipped_bad": 0}
    assert records[0] == {"id": "0", "image_path": str((root / "grey.png").resolve()),
                          "prompt": "Describe the image.", "caption": "a small red circle at the top .",
                          "wrong": "a small blue circle at the top .", "solutions": ["red", "blue"]}
    assert records[1]["image_path"] == str((root / "coco" / "red.jpg").resolve())
    assert records[1]["wrong"] == "A green car."


def test_vicrit_train_path_fallback_and_errors(root, tmp_path):
    """A path with folders that do not exist under the root falls back to its file name there
    (ReDiff keeps the ViCrit images in one folder)."""
    data = [vicrit_train(image="some/other/folder/grey.png"), vicrit_train(image="gone.png")]
    path = write_json(tmp_path / "vicrit_train.json", data)
    with pytest.raises(DataError, match=r"vicrit_train.json: record 1: image file .*gone.png not found"):
        load_vicrit_train(path, root)
    records, stats = load_vicrit_train(path, root, skip_missing=True)
    assert records[0]["image_path"] == str((root / "grey.png").resolve()) and stats["skipped_missing"] == 1
    bad = [vicrit_train(), {k: v for k, v in vicrit_train().items() if k != "solution_target"},
           vicrit_train(changed="a small red circle at the top ."), vicrit_train(problem=3)]
    for index, message in ((1, "field 'solution_target' is missing"), (2, "'changed_caption' equals"),
                           (3, "field 'problem' must be a string")):
        path = write_json(tmp_path / "bad.json", [bad[0], bad[index]])
        with pytest.raises(DataError, match=f"bad.json: record 1: {message}"):
            load_vicrit_train(path, root)
        assert load_vicrit_train(path, root, skip_bad=True)[1]["skipped_bad"] == 1
    with pytest.raises(DataError, match="top level must be a JSON list of ViCrit-Train records"):
        load_vicrit_train(write_json(tmp_path / "dict.json", {"data": []}), root)
    # a ViCrit-Train file given where conversations are expected names the right reader
    with pytest.raises(DataError, match="record 0: a ViCrit-Train record .*--vicrit-train-json"):
        load_llava_json(write_json(tmp_path / "vicrit_train.json", [vicrit_train()]), root)


# ----------------------------------------------------------------------------------------------------------------
# ViCrit-style pair JSONL


def pair(image="grey.png", caption="a small red circle at the top .", wrong="a small blue circle at the top .",
         key="hallucinated", **extra):
    return json.dumps({"image": image, "caption": caption, key: wrong, **extra}, ensure_ascii=False)


def write_lines(path, lines, end="\n"):
    path.write_text("\n".join(lines) + end, encoding="utf-8")
    return path


def test_vicrit_pairs_with_given_and_computed_spans(root, tmp_path):
    lines = [pair(), pair(key="wrong", wrong="a large red circle at the bottom .", id="p2"),
             pair(span=[1, 3], wrong="a large blue circle at the top ."),
             pair(image="coco/red.jpg", caption="A red car.", wrong="A blue car.")]
    records, stats = load_vicrit_jsonl(write_lines(tmp_path / "pairs.jsonl", lines), root)
    assert stats == {"skipped_missing": 0, "skipped_bad": 0}
    assert [r["span"] for r in records] == [(2, 3), (1, 7), (1, 3), (1, 2)]
    assert [r["id"] for r in records] == ["line 1", "p2", "line 3", "line 4"]
    assert records[0]["image_path"] == str((root / "grey.png").resolve())
    assert records[1]["wrong"] == "a large red circle at the bottom ."
    for r in records:
        words, wrong = r["caption"].split(), r["wrong"].split()
        s, e = r["span"]
        assert words[:s] == wrong[:s] and words[e:] == wrong[e:] and words[s:e] != wrong[s:e]


@pytest.mark.parametrize("line, message", [
    (pair(wrong="a small blue circle at top ."), "line 2: field 'hallucinated' has 7 words but 'caption' has 8"),
    (pair(wrong="a small red circle at the top ."), "line 2: field 'hallucinated' equals 'caption'"),
    (pair(span=[3, 5]), "line 2: field 'span'.*covering the differing words"),
    (pair(span=[0, 99]), "line 2: field 'span'"),
    (json.dumps({"image": "grey.png", "caption": "a b", "wrong": "a c", "hallucinated": "a d"}),
     "line 2: .*exactly one of"),
    (json.dumps({"image": "grey.png", "hallucinated": "a c"}), "line 2: field 'caption' is missing"),
    ("[1, 2]", "line 2: expected a JSON object"),
    ("   ", "line 2 is blank"),
    ('{"image": "grey.png", "caption": ', "line 2 is not valid JSON")])
def test_vicrit_bad_lines_name_the_line(root, tmp_path, line, message):
    path = write_lines(tmp_path / "pairs.jsonl", [pair(), line, pair()])
    with pytest.raises(DataError, match=f"pairs.jsonl: {message}"):
        load_vicrit_jsonl(path, root)
    records, stats = load_vicrit_jsonl(path, root, skip_bad=True)
    assert len(records) == 2 and stats["skipped_bad"] == 1


def test_vicrit_torn_or_blank_last_line(root, tmp_path):
    torn = write_lines(tmp_path / "torn.jsonl", [pair(), pair(), pair()[:25]], end="")  # a write cut short
    with pytest.raises(DataError, match="line 3 \\(the last line: probably cut off.*skip_bad=True"):
        load_vicrit_jsonl(torn, root)
    records, stats = load_vicrit_jsonl(torn, root, skip_bad=True)
    assert len(records) == 2 and stats["skipped_bad"] == 1
    blank = write_lines(tmp_path / "blank.jsonl", [pair(), pair(), ""])  # ends "...}\n\n"
    with pytest.raises(DataError, match="line 3 is blank"):
        load_vicrit_jsonl(blank, root)
    assert len(load_vicrit_jsonl(write_lines(tmp_path / "ok.jsonl", [pair()], end=""), root)[0]) == 1


def test_vicrit_non_utf8_line_missing_image_and_escape(root, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(pair().encode() + b"\n" + pair(caption="caf\xe9 x", wrong="caf\xe9 y").encode("latin-1") + b"\n")
    with pytest.raises(DataError, match="line 2, byte .*0xe9.*must be UTF-8"):
        load_vicrit_jsonl(path, root)
    assert load_vicrit_jsonl(path, root, skip_bad=True)[1]["skipped_bad"] == 1
    path = write_lines(path, [pair(), pair(image="gone.png")])
    with pytest.raises(DataError, match="line 2: image file .*gone.png not found"):
        load_vicrit_jsonl(path, root)
    assert load_vicrit_jsonl(path, root, skip_missing=True)[1] == {"skipped_missing": 1, "skipped_bad": 0}
    path = write_lines(path, [pair(image="../outside.png")])
    with pytest.raises(DataError, match="line 1: field 'image'.*outside the image root"):
        load_vicrit_jsonl(path, root)
    assert len(load_vicrit_jsonl(path, root, allow_outside_root=True)[0]) == 1
