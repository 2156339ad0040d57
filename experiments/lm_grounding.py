"""experiments/lm_grounding.py: what makes the toy language model learn to read image tokens?
Exploratory (not the method): the project's LLaDA class fed *perfect* per-cell attribute one-hots
(no vision tower), so only the language model, its initialisation and its loss are tested. Prints
the loss and a probe (colour / position words of true held-out captions masked, argmax accuracy)
every --probe-every steps, and scores 1-token/step captions (frozen sampler, --blocks block
lengths, 0 = one block) at --eval-at steps and at the end.

The tables of docs/toy_world.md ("What made the difference") came from these runs (1 thread each,
two at a time on the 2-core machine, about 0.12 s per step):
    PYTHONPATH=. python experiments/lm_grounding.py --feat gated --d 96 --answer-len 48 \\
        --steps 3000 --stop 1500 --blocks 0 --seed S  # init std 0.02 (GPT-2's); seeds 0 and 1
    ... the same with --lininit fanin             # N(0, 1 / fan_in), what model.py now does
    ... --lininit fanin --lr 3e-3 | --templates B | --posclass 1 | --embinit 0.3     # no better
    ... --feat gated --d 96 --answer-len 48 --steps 3000 --eval-at 1500 2000 2500 --blocks 0 \\
        [--seed 1]
    ... --feat gated --steps 4000 --eval-at 1000 2000 3000  # d 128, 64-token answers: ceiling
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rediff  # noqa: E402
from data import shapes  # noqa: E402
from data.pipeline import answer_ids, prompt_ids  # noqa: E402
from data.score import score_captions  # noqa: E402
from data.tokenizer import WordTokenizer  # noqa: E402
from model import LLaDA, LMConfig  # noqa: E402
from sample import banned_ids, decode_answer  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--feat", default="add", choices=["add", "gated"],
                help="image tokens: attribute one-hots + a one-hot cell (add) or the cell "
                "scaled by occupancy")
ap.add_argument("--steps", type=int, default=1000, help="length of the warm-up + cosine schedule")
ap.add_argument("--stop", type=int, default=0, help="stop after this many steps (0: at --steps)")
ap.add_argument("--batch", type=int, default=32, help="samples per step")
ap.add_argument("--d", type=int, default=128, help="LM width")
ap.add_argument("--layers", type=int, default=4, help="LM layers")
ap.add_argument("--heads", type=int, default=4, help="attention heads")
ap.add_argument("--mlp", type=float, default=8 / 3, help="SwiGLU hidden width / d")
ap.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
ap.add_argument("--warmup", type=int, default=100, help="warm-up steps")
ap.add_argument("--lininit", default="0.02", help="LM linear layers' std, or fanin: 1/sqrt(fan_in)")
ap.add_argument("--embinit", type=float, default=0.02, help="std of the word embeddings")
ap.add_argument("--loss", default="bal", choices=["bal", "eq1"],
                help="bal: one mean per word class (content / other / end-of-text); eq1: the "
                "paper's Eq. 1")
ap.add_argument("--rowmean", action="store_true", help="bal with per-sample class means, averaged")
ap.add_argument("--posclass", type=float, default=0, help="bal, position words a 4th class: weight")
ap.add_argument("--strat", action="store_true", help="stratified mask ratios over the batch")
ap.add_argument("--templates", default="", choices=["", "A", "B"],
                help="other object templates: A all '... a {O} at the {pos}', B the position 3 "
                "words from the object")
ap.add_argument("--answer-len", type=int, default=64, help="answer tokens")
ap.add_argument("--eval-at", type=int, nargs="*", default=[], help="steps to score captions at")
ap.add_argument("--blocks", type=int, nargs="*", default=[16, 0], help="scored block lengths")
ap.add_argument("--neval", type=int, default=100, help="held-out scenes scored")
ap.add_argument("--probe-every", type=int, default=250, help="steps between probe prints")
ap.add_argument("--seed", type=int, default=0, help="initialisation and data seed")
ap.add_argument("--threads", type=int, default=1, help="torch threads")
ap.add_argument("--save", default="", help="save the final state dict here (torch.save)")
a = ap.parse_args()

TEMPLATES = {
    "A": ["there is a {O} at the {pos}", "we can see a {O} at the {pos}",
          "the image shows a {O} at the {pos}", "we see a {O} at the {pos}",
          "there is one {O} at the {pos}"],
    "B": ["there is a {O} at the {pos}", "we can see a {O} at the {pos}", "at the {pos} is a {O}",
          "the {pos} has a {O}", "the image shows a {O} at the {pos}"],
}
if a.templates:  # rewrite the world's grammar in place (captions, scorer and vocabulary follow it)
    shapes.OBJECT_TEMPLATES[:] = [t.replace("{O}", shapes.OBJECT) for t in TEMPLATES[a.templates]]
    shapes.ALL_TEMPLATES[:] = (shapes.OBJECT_TEMPLATES + shapes.SINGULAR_COUNT_TEMPLATES
                               + shapes.PLURAL_COUNT_TEMPLATES + [shapes.RELATION_TEMPLATE])
    shapes._TEMPLATE_WORDS[:] = [t.split() for t in shapes.ALL_TEMPLATES]
    template_words = {w for t in shapes.ALL_TEMPLATES for w in t.split() if not w.startswith("{")}
    slot_words = {w for v in shapes.SLOT_VALUES.values() for x in v for w in x.split()}
    shapes.VOCAB[:] = sorted({".", ","} | template_words | slot_words)
    shapes._LONGEST_SENTENCE = max(shapes._max_words(t) for t in shapes.ALL_TEMPLATES)
    shapes.LONGEST_OBJECT_SENTENCE = max(shapes._max_words(t) for t in shapes.OBJECT_TEMPLATES)
    print("templates", shapes.OBJECT_TEMPLATES, flush=True)

torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
tok = WordTokenizer.for_shapes_world()
world = shapes.WorldConfig(image_size=48, max_words=a.answer_len - 1)
N = 9  # image tokens, one per cell


def cell_feats(scene):
    """Perfect per-cell features (N, 16): shape (6), colour (7), size (3) one-hots; 0: empty."""
    f = torch.zeros(N, 16)
    f[:, [0, 6, 13]] = 1  # every cell empty: class 0 of shape, colour and size
    for o in scene["objects"]:
        c = o["row"] * 3 + o["col"]
        f[c] = 0
        f[c, 1 + shapes.SHAPES.index(o["shape"])] = 1
        f[c, 7 + shapes.COLOURS.index(o["colour"])] = 1
        f[c, 14 + shapes.SIZES.index(o["size"])] = 1
    return f


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm = LLaDA(LMConfig(vocab_size=tok.vocab_size, d_model=a.d, n_layers=a.layers,
                                 n_heads=a.heads, mlp_hidden=int(a.d * a.mlp) // 16 * 16))
        for m in self.lm.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=a.embinit)
            if isinstance(m, nn.Linear):
                fanin = m.in_features ** -0.5
                nn.init.normal_(m.weight, std=fanin if a.lininit == "fanin" else float(a.lininit))
        self.proj = nn.Linear(25, a.d)  # as model.py's "attributes" projector: N(0, 1), zero bias
        nn.init.normal_(self.proj.weight, std=1.0)
        nn.init.zeros_(self.proj.bias)

    def forward(self, ids, f, logits_from=0):
        x = self.lm.embed_tokens(ids)                                            # (B, L, D)
        cells = torch.eye(N).expand(len(f), -1, -1)                              # (B, N, N)
        if a.feat == "gated":
            cells = cells * (1 - f[..., :1])
        x = torch.cat([self.proj(torch.cat([f, cells], -1)), x[:, N:]], 1)
        return self.lm(x, logits_from=logits_from)


model = Model()
prompt = prompt_ids(tok, N)
P = len(prompt)
train = [shapes.make_scene(shapes.scene_rng("train", i), world) for i in range(20000)]
word_ids = lambda words: torch.tensor([tok.encode(w)[0] for w in words])  # noqa: E731
CONTENT = word_ids(shapes.COLOURS + shapes.SHAPES + shapes.SIZES + shapes.POSITIONS)
TF = torch.stack([cell_feats(s) for s in train])
test = [shapes.make_scene(shapes.scene_rng("test", i), world) for i in range(a.neval)]
TEF = torch.stack([cell_feats(s) for s in test])
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)


def evaluate(block, tps=1):
    model.eval()

    class Logits:
        start = P

        def __call__(self, ids):
            return model(ids, TEF, logits_from=self.start)

        def begin(self, start):
            self.start = start

    fn = Logits()
    with torch.no_grad():
        prompts = torch.tensor(prompt).expand(len(test), -1)                    # (B, P)
        out = rediff.generate(fn, prompts, a.answer_len, a.answer_len // tps,
                              block_length=block or a.answer_len, mask_id=tok.mask_id,
                              stop_id=tok.eos_id, banned_ids=banned_ids(tok), on_block=fn.begin)
    model.train()
    texts = [decode_answer(tok, r) for r in out]
    scores = score_captions(texts, test)
    scores["words"] = sum(len(t.split()) for t in texts) / len(texts)
    return scores, texts[0]


def report(step):
    for block in a.blocks:
        scores, example = evaluate(block)
        metrics = ("headline", "factuality", "coverage", "syntax", "repetition", "words")
        print(json.dumps({"step": step, "block": block, "t": round(time.time() - t0),
                          **{k: round(scores[k], 3) for k in metrics}}), flush=True)
    print("   ex:", example, flush=True)


POSITION_IDS, COLOUR_IDS = word_ids(shapes.POSITIONS), word_ids(shapes.COLOURS)


def caption_ids(scenes, rng):
    """Prompt + the answer ids of one fresh caption per scene (B, L)."""
    return torch.tensor([prompt + answer_ids(tok, shapes.make_caption(s, rng, world), a.answer_len)
                         for s in scenes])


def probe():
    """[colour, position] accuracy with only those words of true test captions masked."""
    ids = caption_ids(test, np.random.default_rng(123))
    out = []
    model.eval()
    for words in (COLOUR_IDS, POSITION_IDS):
        hidden = torch.isin(ids, words)
        hidden[:, :P] = False
        with torch.no_grad():
            guess = model(ids.masked_fill(hidden, tok.mask_id), TEF).argmax(-1)
        out.append(round((guess[hidden] == ids[hidden]).float().mean().item(), 3))
    model.train()
    return out


t0 = time.time()
for step in range(a.steps):
    if a.stop and step == a.stop:
        break
    progress = min(1, max(0, step - a.warmup) / (a.steps - a.warmup))
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # down to a tenth of the peak
    lr = a.lr * min(1, (step + 1) / a.warmup) * cosine
    for g in opt.param_groups:
        g["lr"] = lr
    rng = np.random.default_rng([a.seed, step])
    idx = rng.integers(len(train), size=a.batch)
    ids = caption_ids([train[i] for i in idx], rng)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, P:] = True
    noisy, masked, p = rediff.forward_mask(ids, answer, tok.mask_id)
    if a.strat:  # stratified mask ratios over the batch
        u = (torch.randperm(len(ids)) + torch.rand(len(ids))) / len(ids)
        p = 0.999 * u + 0.001
        masked = answer & (torch.rand(ids.shape) < p[:, None])
        noisy = ids.masked_fill(masked, tok.mask_id)
    logits = model(noisy, TF[idx])
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
    ce = ce.view(ids.shape)                                                      # (B, L)
    content = torch.isin(ids, CONTENT) & masked
    eos = (ids == tok.eos_id) & masked
    other = masked & ~eos & ~content
    mean = lambda m: (ce * m).sum() / m.sum().clamp(min=1)  # noqa: E731
    if a.loss == "eq1":
        loss = rediff.masked_diffusion_loss(logits, ids, masked, p, answer)
    elif a.rowmean:
        parts = []
        for m in (content, other, eos):
            count = m.sum(1)
            has = count > 0
            parts.append(((ce * m).sum(1)[has] / count[has]).mean() if has.any() else ce.sum() * 0)
        loss = sum(parts)
    elif a.posclass:
        position = content & torch.isin(ids, POSITION_IDS)
        loss = mean(content & ~position) + a.posclass * mean(position) + mean(other) + mean(eos)
    else:
        loss = mean(content) + mean(other) + mean(eos)
    opt.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if step % a.probe_every == 0:
        print(step, round(loss.item(), 3), round(time.time() - t0, 1), "gn",
              round(grad_norm.item(), 2), "probe colour/position", probe(), flush=True)
    if step + 1 in a.eval_at:
        report(step + 1)
report(step + 1)
if a.save:
    torch.save(model.state_dict(), a.save)
