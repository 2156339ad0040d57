"""data/pipeline.py: shapes-world scenes -> model batches (images, prompt + answer ids, masks)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data import shapes

PROMPT = "describe the image ."  # the toy world's one instruction, after the image placeholders
SCENE_POOL = 100_000  # held_out_indices draws distinct test-split scene indices from this many


def to_pixels(images: list) -> np.ndarray:  # PIL images -> one uint8 array
    return np.stack([np.asarray(im, dtype=np.uint8) for im in images])              # (B, S, S, 3)


def image_to_tensor(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """PIL images (or a uint8 array (B, S, S, 3)) -> normalised float tensor (B, 3, S, S)."""
    array = to_pixels(images) if isinstance(images, list) else images               # (B, S, S, 3)
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()  # (B, 3, S, S)
    return (x / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def held_out_indices(n: int, seed: int) -> list[int]:
    """Not in the paper: the toy world's held-out evaluation scenes, n distinct test-split indices
    out of SCENE_POOL drawn by seed, sorted (shared by the evaluation and sample.py)."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(SCENE_POOL, size=n, replace=False).tolist())


def prompt_ids(tokenizer, n_image_tokens: int, text: str = PROMPT) -> list[int]:
    """One placeholder per image token (the model splices image tokens in there), then the text."""
    return [tokenizer.image_id] * n_image_tokens + tokenizer.encode(text)


def answer_ids(tokenizer, caption: str, answer_len: int, stats: dict | None = None) -> list[int]:
    """The caption, then end-of-text up to answer_len (LLaDA pads answers with EOS and trains on it:
    the model learns where to stop). Too long: truncated, counted in stats["truncated"]."""
    ids = tokenizer.encode(caption, stats)
    if len(ids) > answer_len - 1:
        ids = ids[:answer_len - 1]
        if stats is not None:
            stats["truncated"] = stats.get("truncated", 0) + 1
    return ids + [tokenizer.eos_id] * (answer_len - len(ids))


@dataclass
class Batch:
    images: torch.Tensor          # (B, 3, S, S)
    ids: torch.Tensor             # (B, L): prompt then answer
    answer_mask: torch.Tensor     # (B, L) bool
    scenes: list
    wrong_ids: torch.Tensor | None = None   # (B, L) hallucinated copy of ids
    wrong_span: torch.Tensor | None = None  # (B, L) bool: the hallucinated words

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.images), move(self.ids), move(self.answer_mask), self.scenes,
                     move(self.wrong_ids), move(self.wrong_span))


class ShapesData:
    """A bank of pre-rendered scenes of one split; each draw of a scene gets a fresh caption.
    batch(step, ...) depends only on (seed, step): a resumed run sees the same batches."""

    def __init__(self, tokenizer, world: shapes.WorldConfig, split: str, n_scenes: int,
                 n_image_tokens: int, answer_len: int, seed: int = 0, mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5)):
        self.tokenizer, self.world, self.split = tokenizer, world, split
        self.answer_len, self.seed, self.mean, self.std = answer_len, seed, mean, std
        samples = [shapes.sample(split, i, world) for i in range(n_scenes)]
        self.scenes = [s["scene"] for s in samples]
        self.captions = [s["caption"] for s in samples]  # each scene's fixed one (for evaluation)
        self.pixels = to_pixels([s["image"] for s in samples])                      # (n, S, S, 3)
        self.prompt = prompt_ids(tokenizer, n_image_tokens)
        self.stats: dict = {}

    def __len__(self) -> int:
        return len(self.scenes)

    def images(self, index) -> torch.Tensor:
        return image_to_tensor(self.pixels[index], self.mean, self.std)  # (B, 3, S, S)

    def batch(self, step: int, batch_size: int, hallucination_frac: float = 0.0) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        index = rng.integers(len(self), size=batch_size)
        ids, wrong, spans = [], [], []
        P = len(self.prompt)
        for i in index:
            scene = self.scenes[i]
            caption = shapes.make_caption(scene, rng, self.world)
            hallucinate = rng.random() < hallucination_frac  # drawn before the pair, as always
            pair = shapes.hallucination_pair(scene, caption, rng) if hallucinate else None
            row = self.prompt + answer_ids(self.tokenizer, caption, self.answer_len, self.stats)
            ids.append(row)
            span, wrong_row = [False] * len(row), list(row)
            if pair is not None:
                bad = self.tokenizer.encode(pair["wrong"])
                for w in range(*pair["span"]):
                    if P + w < len(row) - 1 and w < len(bad):
                        wrong_row[P + w], span[P + w] = bad[w], True
            wrong.append(wrong_row)
            spans.append(span)
        ids = torch.tensor(ids)                                                          # (B, L)
        answer_mask = torch.zeros_like(ids, dtype=torch.bool)
        answer_mask[:, P:] = True
        return Batch(self.images(index), ids, answer_mask, [self.scenes[i] for i in index],
                     torch.tensor(wrong), torch.tensor(spans))
