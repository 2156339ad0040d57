"""tests/test_shapes.py: determinism, splits, vocabulary, caption variety, rendering and hallucination
pairs; the shapes world's training aids (shapes_aids.py)."""
import math

import numpy as np
import pytest
import torch

import shapes_aids
from data.score import score_caption
from data.shapes import (COLOURS, GRID, PALETTE, POSITIONS, VOCAB, WorldConfig, hallucination_pair,
                         make_caption, make_scene, render, sample, scene_rng)

SCENE_3 = {"objects": [{"shape": "circle", "colour": "red", "size": "large", "row": 0, "col": 0},
                       {"shape": "square", "colour": "blue", "size": "small", "row": 1, "col": 2},
                       {"shape": "star", "colour": "yellow", "size": "large", "row": 2, "col": 1}]}


def test_same_split_and_index_give_identical_samples():
    a, b = sample("train", 7), sample("train", 7)
    assert a["caption"] == b["caption"] and a["scene"] == b["scene"] and a["index"] == 7
    assert a["image"].tobytes() == b["image"].tobytes()


def test_splits_and_indices_differ():
    scenes = {split: [sample(split, i)["scene"] for i in range(20)] for split in ("train", "val", "test")}
    assert scenes["train"] != scenes["val"] != scenes["test"] != scenes["train"]
    train_captions = {sample("train", i)["caption"] for i in range(20)}
    assert len(train_captions) == 20


def test_scene_graphs_are_valid():
    cfg = WorldConfig()
    for i in range(200):
        objects = make_scene(scene_rng("train", i), cfg)["objects"]
        assert cfg.min_objects <= len(objects) <= cfg.max_objects
        assert len({(o["row"], o["col"]) for o in objects}) == len(objects), "one object per cell"


def test_captions_use_vocab_and_fit_max_words():
    vocab = set(VOCAB)
    for split in ("train", "val", "test"):
        for i in range(200):
            words = sample(split, i)["caption"].split()
            assert set(words) <= vocab and len(words) <= WorldConfig().max_words
    # A tight budget forces optional sentences out, but never an object sentence.
    tight = WorldConfig(max_words=48, p_count=1.0, p_relation=1.0)
    for i in range(100):
        rng = scene_rng("val", i)
        scene = make_scene(rng, tight)
        caption = make_caption(scene, rng, tight)
        assert len(caption.split()) <= 48 and score_caption(caption, scene)["headline"] == 100


def test_many_distinct_captions_per_scene():
    rng = np.random.default_rng(0)
    captions = {make_caption(SCENE_3, rng, WorldConfig()) for _ in range(50)}
    assert len(captions) >= 10


def test_render_size_mode_and_object_in_its_cell():
    cfg = WorldConfig()
    image = render(SCENE_3, np.random.default_rng(0), cfg)
    assert image.size == (cfg.image_size, cfg.image_size) and image.mode == "RGB"
    cell = cfg.image_size / GRID
    for o in SCENE_3["objects"]:
        if o["size"] != "large":
            continue
        pixel = np.array(image.getpixel((int((o["col"] + 0.5) * cell), int((o["row"] + 0.5) * cell))))
        nearest = min(COLOURS, key=lambda c: np.abs(pixel - np.array(PALETTE[c])).sum())
        assert nearest == o["colour"]
    empty = np.array(image.getpixel((int(1.5 * cell), int(1.5 * cell))))  # the center cell is empty
    assert empty.min() > 200, "background is light"


def test_large_objects_cover_more_pixels_than_small():
    cfg, rng = WorldConfig(), np.random.default_rng(1)

    def ink(size: str) -> int:
        scene = {"objects": [{"shape": "square", "colour": "blue", "size": size, "row": 1, "col": 1}]}
        return int((np.array(render(scene, rng, cfg)).min(axis=2) < 150).sum())
    assert ink("large") > 2 * ink("small")


def test_hallucination_pairs():
    made = 0
    for i in range(100):
        s = sample("test", i)
        pair = hallucination_pair(s["scene"], s["caption"], np.random.default_rng(i))
        if pair is None:
            continue
        made += 1
        right, wrong = pair["correct"].split(), pair["wrong"].split()
        start, end = pair["span"]
        assert pair["correct"] == s["caption"] and len(right) == len(wrong) and 0 <= start < end <= len(right)
        assert right[:start] == wrong[:start] and right[end:] == wrong[end:] and right[start:end] != wrong[start:end]
        assert score_caption(pair["correct"], s["scene"])["factuality"] == 1
        assert score_caption(pair["wrong"], s["scene"])["factuality"] < 1
        assert score_caption(pair["wrong"], s["scene"])["syntax"] == 1, "the swap keeps the grammar"
    assert made >= 95


def test_position_swap_is_another_position():
    caption = "there is a large red circle at the top-left ."
    scene = {"objects": [SCENE_3["objects"][0]]}
    swapped = 0
    for seed in range(20):
        pair = hallucination_pair(scene, caption, np.random.default_rng(seed))
        wrong = pair["wrong"].split()
        if pair["span"] == (8, 9):
            swapped += 1
            assert wrong[8] in POSITIONS and wrong[8] != "top-left" and len(wrong) == len(caption.split())
    assert swapped > 0
    assert hallucination_pair(scene, "there is one object .", np.random.default_rng(0)) is None


# ------------------------------------------------------------------------------------------------
# shapes_aids.py


def test_word_class_loss_hand_example_one_plain_mean_per_class():
    logits = torch.zeros(1, 5, 3)                                # uniform: every CE is log 3
    logits[0, 1] = torch.tensor([math.log(4.0), 0.0, 0.0])       # p(target 0) = 4/6 at position 1
    targets = torch.zeros(1, 5, dtype=torch.long)
    masked = torch.tensor([[False, True, True, True, False]])
    classes = torch.tensor([[0, 0, 0, 2, 0]])  # position 4: class 0 but visible; class 1 empty
    total, parts = shapes_aids.word_class_loss(logits, targets, masked, classes, 3)
    assert parts[0].item() == pytest.approx((-math.log(4 / 6) + math.log(3)) / 2)  # no 1/t
    assert parts[1].item() == 0.0                                  # an empty class contributes 0
    assert parts[2].item() == pytest.approx(math.log(3))  # by its own count (1), not by 3
    assert total.item() == pytest.approx(sum(p.item() for p in parts))


def test_word_classes_content_other_and_end_of_text():
    from data.tokenizer import WordTokenizer
    tok = WordTokenizer.for_shapes_world()
    words = "there is a large red circle at the top-left".split()
    ids = torch.tensor([[tok.encode(w)[0] for w in words] + [tok.eos_id]])       # (1, 10)
    classes = shapes_aids.word_classes(ids, tok)[0].tolist()
    assert classes == [1, 1, 1, 0, 0, 0, 1, 1, 0, 2]


def test_attribute_features_hand_example():
    classes = [2, 3]                                     # two groups; class 0 of each = empty
    head_logits = torch.zeros(1, 2, 5)                   # (B, N, A): two cells
    head_logits[0, 0, 0] = math.log(3.0)                 # cell 0: P(empty) = 3/4 in group 1
    features = shapes_aids.attribute_features(head_logits, classes)               # (1, 2, 7)
    assert features.shape == (1, 2, 5 + 2)
    torch.testing.assert_close(features[0, :, :5].sum(-1), torch.tensor([2.0, 2.0]))  # 2 groups
    empty = (3 / 4 + 1 / 3) / 2                          # cell 0's P(empty), averaged over groups
    torch.testing.assert_close(features[0, :, 5:], torch.tensor([[1 - empty, 0.0],
                                                                  [0.0, 1 - (1 / 2 + 1 / 3) / 2]]))
