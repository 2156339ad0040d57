"""data/captions.py: real caption records -> global batches of answer ids, and some rows of a
batch as a LLaDA-V / ReDiff model sees them (data/pipeline.py does this for the shapes world).

A row: the LLaDA chat prompt (one placeholder per image token, their number from the image's anyres
layout, then the question), the answer (caption, <|eot_id|>, then <|endoftext|> up to answer_len:
LLaDA trains on that padding), then <|endoftext|> up to the longest row of its micro-batch (visible,
never masked or scored). Only the answer is masked, corrupted and scored, and only the answer's
positions get logits (llada_v.answer_logits).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data.loaders import DataError, load_llava_json, load_vicrit_jsonl, load_vicrit_train
from llada_v import CAPTION_QUESTION, EOS_ID, EOT_ID, AnyresImages, anyres_images, prompt_ids


@functools.lru_cache(maxsize=4)
def shuffled(n: int, seed: int, stream: int, epoch: int) -> np.ndarray:  # one pass's order
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


def take(records: list, seed: int, stream: int, start: int, count: int) -> list:
    """Items start .. start + count - 1 of an endless sequence of shuffled passes over `records`."""
    return [records[shuffled(len(records), seed, stream, pos // len(records))[pos % len(records)]]
            for pos in range(start, start + count)]


@dataclass
class Batch:
    """A global batch at the level of its answers: what the masks and corruptions are drawn on (the
    same draws however the rows are padded, spread over processes or split into micro-batches)."""
    records: list               # B data records (image_path, prompt, caption ...)
    answers: torch.Tensor       # (B, A) caption, <|eot_id|>, <|endoftext|> padding
    wrong: torch.Tensor         # (B, A) the hallucinated answer of pair rows, else the answer

    @property
    def wrong_span(self) -> torch.Tensor:                                            # (B, A) bool
        return self.wrong != self.answers


@dataclass
class Rows:
    """Some rows of a global batch as the model sees them: padded to their own longest row."""
    ids: torch.Tensor           # (b, L) prompt (placeholders), answer input, <|endoftext|> padding
    answer_at: torch.Tensor     # (b, A) each answer position, counted from `start`
    start: int                  # the first answer position of these rows: the model's logits_from
    images: AnyresImages        # these rows' images: their anyres views and (width, height)

    def to(self, device) -> Rows:
        return Rows(self.ids.to(device), self.answer_at.to(device), self.start,
                    self.images.to(device))


class CaptionData:
    """Step s takes the next batch_size - k captions of an endless sequence of shuffled passes, and
    k = round(hallucination_frac x batch_size) hallucination pairs (ViCrit, revise records) from a
    second one: a batch depends only on (seed, step)."""

    def __init__(self, captions: list, pairs: list, model, tokenizer, answer_len: int, seed: int):
        self.captions, self.model, self.tokenizer = captions, model, tokenizer
        self.answer_len, self.seed = answer_len, seed
        self.stats = {"captions_cut": 0, "pairs_dropped_token_counts_differ": 0}
        self.pairs = []
        for record in pairs:  # tokenised once: usable when both captions have the same token count
            right, wrong = tokenizer.encode(record["caption"]), tokenizer.encode(record["wrong"])
            solutions = [tokenizer.encode(text) for text in record.get("solutions", [])]  # ViCrit
            if len(right) == len(wrong) and len({len(ids) for ids in solutions}) <= 1:
                self.pairs.append(dict(record, ids=right, wrong_ids=wrong))
            else:
                self.stats["pairs_dropped_token_counts_differ"] += 1
        self.sizes: dict[str, tuple] = {}

    def image_size(self, path: str) -> tuple[int, int]:
        """(width, height) from the file header (no decoding): a row's placeholder count."""
        if path not in self.sizes:
            try:
                with Image.open(path) as im:
                    self.sizes[path] = im.size
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: cannot read the image header ({err}); replace the file "
                                f"or remove its record") from None
        return self.sizes[path]

    def prompt(self, record: dict) -> list[int]:
        """The record's chat prompt ids, with as many image placeholders as its image has tokens."""
        n_image = self.model.n_image_tokens(self.image_size(record["image_path"]))
        return prompt_ids(self.tokenizer, n_image, record.get("prompt") or CAPTION_QUESTION)

    def answer(self, ids: list[int], count: bool = True, length: int = 0) -> list[int]:
        """Caption ids -> exactly `length` (default answer_len) ids: caption, <|eot_id|>,
        <|endoftext|> padding; a longer caption is cut (no end of turn: it did not end)."""
        n = length or self.answer_len
        if len(ids) >= n:
            self.stats["captions_cut"] += count
            return ids[:n]
        return ids + [EOT_ID] + [EOS_ID] * (n - len(ids) - 1)

    def records(self, step: int, batch_size: int, hallucination_frac: float = 0.0) -> list[dict]:
        k = round(hallucination_frac * batch_size) if self.pairs else 0
        return (take(self.captions, self.seed, 0, step * (batch_size - k), batch_size - k)
                + take(self.pairs, self.seed, 1, step * k, k))

    def batch(self, step: int, batch_size: int, hallucination_frac: float = 0.0) -> Batch:
        """The global batch of `step`: its records and their answers (B, A)."""
        records = self.records(step, batch_size, hallucination_frac)
        answers = [self.answer(r["ids"] if "ids" in r else self.tokenizer.encode(r["caption"]))
                   for r in records]
        wrongs = [self.answer(r["wrong_ids"], count=False) if "wrong_ids" in r else a
                  for r, a in zip(records, answers)]
        return Batch(records, torch.tensor(answers), torch.tensor(wrongs))

    def rows(self, records: list, prompts: list, answers: torch.Tensor) -> Rows:
        """Records with their prompts (lists of ids) and answer inputs (b, A) -> the rows the model
        sees: prompt, answer, <|endoftext|> up to the longest row; answer_at: each answer position
        counted from start, the first answer position of any row; the images decoded."""
        lengths = torch.tensor([len(p) for p in prompts])                            # (b,)
        A = answers.shape[1]
        ids = torch.full((len(prompts), int(lengths.max()) + A), EOS_ID)             # (b, L)
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = torch.tensor(prompt)
            ids[b, len(prompt):len(prompt) + A] = answers[b]
        start = int(lengths.min())
        answer_at = (lengths - start)[:, None] + torch.arange(A)[None, :]           # (b, A)
        return Rows(ids, answer_at, start,
                    anyres_images(self.model, [r["image_path"] for r in records]))

    def batch_rows(self, batch: Batch, inputs: torch.Tensor, rows: slice) -> Rows:
        """Rows `rows` of the global batch with `inputs` (B, A) in their answers."""
        records = batch.records[rows]
        return self.rows(records, [self.prompt(r) for r in records], inputs[rows])

    def warn(self) -> None:
        """Say what the batches cut or dropped (never silent)."""
        cut, dropped = self.stats["captions_cut"], self.stats["pairs_dropped_token_counts_differ"]
        if cut or dropped:
            print(f"warning: {cut} caption draws cut to --answer-len (no end of turn learnt for "
                  f"them); {dropped} hallucination pairs dropped (token counts differ)")


def load_captions(cfg, objective: str) -> tuple[list, list]:
    """-> (captions, hallucination pairs) from the flags --data-json, --image-root, --vicrit-jsonl,
    --vicrit-train-json, --skip-missing, --skip-bad. Records of --data-json with ReDiff's "revise"
    corrections hold a wrong answer: they are pairs (for `objective` mask: captions, their
    corrected text), never captions to learn as written."""
    root = cfg.image_root or os.path.dirname(os.path.abspath(cfg.data_json))
    args = (root, cfg.skip_missing, cfg.skip_bad)
    try:
        records, stats = load_llava_json(cfg.data_json, *args)
        pairs, pair_stats = [], {}
        if cfg.vicrit_jsonl:
            pairs, pair_stats = load_vicrit_jsonl(cfg.vicrit_jsonl, *args)
        if cfg.vicrit_train_json:
            more, more_stats = load_vicrit_train(cfg.vicrit_train_json, *args)
            pairs += more
            pair_stats = {k: pair_stats.get(k, 0) + v for k, v in more_stats.items()}
    except DataError as err:  # the loaders name their keyword arguments; here they are flags
        raise SystemExit(str(err).replace("skip_missing=True", "--skip-missing")
                         .replace("skip_bad=True", "--skip-bad")
                         .replace("allow_outside_root=True", "an --image-root that holds it")) \
            from None
    except FileNotFoundError as err:
        raise SystemExit(f"{err.filename}: file not found; check --data-json / --vicrit-jsonl / "
                         f"--vicrit-train-json") from None
    revised = [r for r in records if "revise" in r]
    captions = [r for r in records if "revise" not in r]
    if objective == "mask":
        captions += [{k: v for k, v in r.items() if k not in ("wrong", "revise")} for r in revised]
    else:
        pairs = revised + pairs
    if revised:
        print(f"{len(revised)} records of {cfg.data_json} carry \"revise\" corrections: "
              + ("their corrected captions train as captions" if objective == "mask"
                 else "hallucination pairs (assistant turn as written -> corrected)"))
    if not captions:
        raise SystemExit(f"{cfg.data_json}: no usable caption record ({stats}); fix the data or "
                         f"--image-root")
    print(f"{len(captions)} captions (skipped {stats}), {len(pairs)} hallucination pairs (skipped "
          f"{pair_stats})")
    return captions, pairs
