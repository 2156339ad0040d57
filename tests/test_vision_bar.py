"""The toy tower's pretraining bar (shapes_aids.pretrain_vision with held-out scenes): the held-out
accuracy counts occupied cells only, and rounds repeat, at half the rate each, until the bar."""
import torch

import shapes_aids
from data import shapes
from data.pipeline import ShapesData
from data.tokenizer import WordTokenizer
from model import LMConfig, VisionConfig, VLM, VLMConfig


def tiny_model():
    torch.manual_seed(0)
    lm = LMConfig(vocab_size=60, d_model=16, n_layers=1, n_heads=2, mlp_hidden=32)
    vision = VisionConfig(image_size=48, patch_size=16, width=32, layers=1, heads=1)
    return VLM(VLMConfig(lm=lm, vision=vision, image_token_id=3, image_features="attributes",
                         attribute_classes=shapes_aids.attribute_classes()))


def scenes(split: str, n: int) -> ShapesData:
    return ShapesData(WordTokenizer.for_shapes_world(), shapes.WorldConfig(), split, n, 9, 64, 0)


def test_cell_accuracy_counts_occupied_cells_only():
    model, held_out = tiny_model(), scenes("val", 6)
    labels = shapes_aids.cell_labels(held_out.scenes, 3, "cpu")                 # (6, 9, 3)
    n_classes = sum(shapes_aids.attribute_classes())

    def always(classes):  # a head that predicts these (shape, colour, size) classes everywhere
        starts = shapes_aids.empty_class_index(shapes_aids.attribute_classes())
        logits = torch.zeros(n_classes)
        for start, k in zip(starts, classes):
            logits[start + k] = 1.0
        return lambda tokens: logits.expand(*tokens.shape[:-1], n_classes)

    assert shapes_aids.cell_accuracy(model, always((0, 0, 0)), held_out, "cpu") == 0.0
    occupied = labels[..., 0] > 0
    first = labels[occupied][0].tolist()  # one object's classes: right where all three match
    same = (labels[occupied] == torch.tensor(first)).all(-1).float().mean().item()
    assert abs(shapes_aids.cell_accuracy(model, always(first), held_out, "cpu") - same) < 1e-6


def test_rounds_repeat_until_the_bar(capsys):
    train, held_out = scenes("train", 16), scenes("val", 4)
    model = tiny_model()
    shapes_aids.pretrain_vision(model, train, 2, 4, "cpu", 0, held_out=held_out, bar=1.01,
                                max_rounds=3)                         # a bar no tower reaches
    reports = [line for line in capsys.readouterr().out.splitlines() if "held-out" in line]
    assert len(reports) == 3 and "(round 3)" in reports[-1]
    model = tiny_model()
    accuracy = shapes_aids.pretrain_vision(model, train, 2, 4, "cpu", 0, held_out=held_out,
                                           bar=0.0, max_rounds=3)  # no bar: one round, measured
    reports = [line for line in capsys.readouterr().out.splitlines() if "held-out" in line]
    assert len(reports) == 1 and f"{accuracy:.3f}" in reports[0]
    head = model.attribute_head
    assert accuracy == shapes_aids.cell_accuracy(model, head, held_out, "cpu")


def test_each_round_halves_the_peak_rate(monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    shapes_aids.pretrain_vision(tiny_model(), scenes("train", 16), 40, 2, "cpu", 0,
                                held_out=scenes("val", 2), bar=1.01, max_rounds=2)
    first, second = max(seen[:40]), max(seen[40:])
    assert len(seen) == 80 and abs(second - first / 2) < 1e-12
