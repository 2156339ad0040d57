"""experiments/grounding.py: exploratory runs behind the README's grounding table (not part of the method): how fast
does the toy language model learn to bind caption words to image tokens under one change at a time?

Not a polished script: it patches the shapes world's module globals for its variants. Every run prints one JSON line
per --eval-at step with the grounding probe (eval.grounding_probe on 100 test scenes) and, at the end, the scorer's
metrics at 1 token per step. Example (the README table lists the flags of each row):
    PYTHONPATH=. python experiments/grounding.py --symbolic soft --batch 32 --steps 1300 --eval-at 325 650 975
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rediff, train_stage1 as ts
from data import shapes
from data.pipeline import ShapesData
from data.tokenizer import WordTokenizer
import eval as ev

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=600, help='optimizer steps (length of the cosine schedule)')
ap.add_argument("--batch", type=int, default=64, help='batch size')
ap.add_argument("--answer-len", type=int, default=64, help='answer tokens')
ap.add_argument("--lr", type=float, default=2e-3, help='peak learning rate')
ap.add_argument("--layers", type=int, default=4, help='language-model layers')
ap.add_argument("--d", type=int, default=128, help='language-model width')
ap.add_argument("--eval-at", type=int, nargs="*", default=[], help='steps at which the probe is printed')
ap.add_argument("--tag", default="x", help='name printed with every line')
ap.add_argument("--curriculum", type=int, default=0, help='steps over which the objects per scene grow from 1 to 4 (0: always 1-4)')
ap.add_argument("--templates", type=int, nargs="*", default=None, help='indices of the object templates to keep (default all)')
ap.add_argument("--posword", action="store_true", help="add the embeddings of a cell's position words to its image token")
ap.add_argument("--no-optional", action="store_true", help='no count or relation sentences')
ap.add_argument("--loss", default="mask", choices=["mask", "content"], help='Eq. 1, or cross-entropy on masked content words only')
ap.add_argument("--threads", type=int, default=1, help='torch threads')
ap.add_argument("--learned-pos", action="store_true", help='a learned position embedding added to the image tokens')
ap.add_argument("--unfreeze", action="store_true", help='train the vision tower too')
ap.add_argument("--single", type=int, default=0, help='steps of one-sentence captions (one random object) first')
ap.add_argument("--max-objects", type=int, default=4, help='objects per scene at most')
ap.add_argument("--attr-mask", type=int, default=0, help='steps of the alignment warm-up (only attribute words masked)')
ap.add_argument("--heads", type=int, default=4, help='attention heads')
ap.add_argument("--symbolic", default="", help='hard / soft: image tokens from a per-cell attribute classifier on the frozen tower')
ap.add_argument("--spaced", action="store_true", help='two-word position names ("top left", the world before '
                'single-token names; rows 1-7 of the README table)')
ap.add_argument("--stop", type=int, default=0, help='stop after this step (the schedule stays --steps long)')
ap.add_argument("--theta", type=float, default=0, help='RoPE theta (0: the model default)')
ap.add_argument("--mix", type=float, default=0.0, help='share of every batch (rows) with attribute-only masking, the rest Eq. 1, for all steps')
ap.add_argument("--tied", action="store_true", help='with --symbolic: the attribute and position embeddings of image tokens are the LM word embeddings')
ap.add_argument("--full-evals", action="store_true", help='captions and scores (1 token per step) at every --eval-at step too')
ap.add_argument("--single-frac", type=float, default=1.0, help='share of one-sentence captions during --single')
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
if a.spaced:
    shapes.POSITIONS[:] = [p.replace("-", " ") for p in shapes.POSITIONS]
    shapes.VOCAB = sorted(set(shapes.VOCAB) | {w for p in shapes.POSITIONS for w in p.split()})
if a.templates is not None:
    shapes.OBJECT_TEMPLATES = [shapes.OBJECT_TEMPLATES[k] for k in a.templates]
cfg = ts.TrainConfig(d_model=a.d, n_layers=a.layers, n_heads=a.heads, steps=a.steps, batch_size=a.batch, lr=a.lr,
                     answer_len=a.answer_len, objective="mask")
tok = WordTokenizer.for_shapes_world()
model = ts.build_model(cfg, tok)
if a.theta:
    model.lm.cfg.rope_theta = a.theta
kw = dict(p_count=0.0, p_relation=0.0) if a.no_optional else {}
world = shapes.WorldConfig(image_size=48, max_words=a.answer_len - 1, max_objects=a.max_objects, **kw)
data = ShapesData(tok, world, "train", 10000, model.n_image_tokens, a.answer_len, 0)
banks = {k: ShapesData(tok, shapes.WorldConfig(image_size=48, max_words=a.answer_len - 1, max_objects=k, **kw), "train", 3000, model.n_image_tokens, a.answer_len, 0) for k in (1, 2, 3)} if a.curriculum else {}
t0 = time.time()
vt = os.environ.get("GROUNDING_TOWER", "runs/grounding_tower.pt")  # the pretrained tower, cached
os.makedirs(os.path.dirname(vt) or ".", exist_ok=True)
if os.path.exists(vt):
    model.vision_tower.load_state_dict(torch.load(vt, weights_only=True))
else:
    ts.pretrain_vision(model, data, 200, 128, "cpu", 0)
    torch.save(model.vision_tower.state_dict(), vt)
if not a.unfreeze:
    model.vision_tower.requires_grad_(False); model.vision_tower.eval()
orig_encode = model.encode_images
if a.symbolic:
    sizes = [len(shapes.SHAPES) + 1, len(shapes.COLOURS) + 1, len(shapes.SIZES) + 1]
    heads = [torch.nn.Linear(128, n) for n in sizes]
    with torch.no_grad():
        ftr = model.vision_tower(data.images(np.arange(3000)))
    ltr = ts.cell_labels(data.scenes[:3000], 3, "cpu")
    for k, h in enumerate(heads):
        o = torch.optim.Adam(h.parameters(), 1e-2)
        for it in range(300):
            l = F.cross_entropy(h(ftr.flatten(0, 1)), ltr[..., k].flatten()); o.zero_grad(); l.backward(); o.step()
        h.requires_grad_(False)
    model.sym = torch.nn.ModuleList([torch.nn.Embedding(n, a.d) for n in sizes] + [torch.nn.Embedding(9, a.d)])
    word_rows = [[tok.encode(w)[0] for w in vals] for vals in (shapes.SHAPES, shapes.COLOURS, shapes.SIZES)]
    pos_rows = [tok.encode(p.split()[-1])[0] for p in shapes.POSITIONS]
    def enc_sym(images):
        with torch.no_grad():
            f = model.vision_tower(images)
        if a.tied:  # class 0 (empty cell) keeps its own learned vector, the others are the LM's word embeddings
            E = model.lm.embed_tokens.weight
            out = 0
            for k in range(3):
                table = torch.cat([model.sym[k].weight[:1], E[word_rows[k]]])
                pr = heads[k](f).softmax(-1)
                if a.symbolic == "hard":
                    pr = F.one_hot(pr.argmax(-1), pr.shape[-1]).float()
                out = out + pr @ table
            return out + E[pos_rows]
        if a.symbolic == "hard":
            out = sum(model.sym[k](heads[k](f).argmax(-1)) for k in range(3))
        else:  # soft: probabilities times the embedding tables
            out = sum(heads[k](f).softmax(-1) @ model.sym[k].weight for k in range(3))
        return out + model.sym[3].weight
    model.encode_images = enc_sym
    print("symbolic heads fitted", round(time.time() - t0), flush=True)
if a.posword:
    pw = torch.zeros(9, len(tok.vocab) if hasattr(tok, "vocab") else 64)
    rows = []
    for p in shapes.POSITIONS:
        rows.append([tok.encode(w)[0] for w in p.split()])
    def enc(images):
        e = orig_encode(images)
        add = torch.stack([model.lm.embed_tokens.weight[r].sum(0) for r in rows])  # (9, D)
        return e + add
    model.encode_images = enc
if a.learned_pos:
    model.img_pos = torch.nn.Parameter(torch.randn(9, a.d) * 0.02)
    def enc2(images, _o=model.encode_images):
        return _o(images) + model.img_pos
    model.encode_images = enc2
content = set()
for vals in shapes.SLOT_VALUES.values():
    for v in vals:
        for w in v.split(): content.add(w)
attr_ids = torch.tensor(sorted(tok.encode(w)[0] for w in shapes.COLOURS + shapes.SHAPES + shapes.SIZES))
content_ids = torch.tensor(sorted(tok.encode(w)[0] for w in content))
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
def lr_at(s):
    if s < 100: return a.lr * (s + 1) / 100
    pr = (s - 100) / max(1, a.steps - 100)
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(pr, 1))))
idx = ev.held_out_indices(100, 0)
def report(step, full=False):
    model.eval()
    with torch.no_grad():
        pr = ev.grounding_probe(model, tok, world, a.answer_len, idx)
        sc = ev.evaluate(model, tok, world, a.answer_len, idx, 1, True) if full else dict(headline=0, factuality=0, coverage=0, syntax=0)
    model.train()
    if not a.unfreeze: model.vision_tower.eval()
    print(json.dumps({"tag": a.tag, "step": step, "t": round(time.time() - t0), "colour": round(pr["colour (own image)"], 2),
          "shape": round(pr["shape (own image)"], 2), "size": round(pr["size (own image)"], 2),
          "position": round(pr.get("position (own image)", float("nan")), 2),  # absent with --spaced
          **{k: round(sc[k], 3) for k in ("headline", "factuality", "coverage", "syntax")}}), flush=True)
    if full:
        print("\n".join(sc["examples"]), flush=True)
orig_caption_for = shapes.caption_for
def single_caption(scene, rng, cfg):
    if rng.random() < a.single_frac:
        objs = scene["objects"]
        return shapes._object_sentence(objs[rng.integers(len(objs))], rng) + " ."
    return orig_caption_for(scene, rng, cfg)
model.train()
if not a.unfreeze: model.vision_tower.eval()
for step in range(a.steps):
    for g in opt.param_groups: g["lr"] = lr_at(step)
    k = 1 + step * 4 // a.curriculum if a.curriculum else 4
    shapes.caption_for = single_caption if step < a.single else orig_caption_for
    b = (banks[k] if k < 4 else data).batch(step, a.batch)
    gen = torch.Generator().manual_seed(step)
    emb = model.encode_images(b.images)
    if a.mix:
        n_attr = int(round(a.mix * b.ids.shape[0]))
        _, attr_masked, _ = rediff.mask_words(b.ids, b.answer_mask, attr_ids, tok.mask_id, generator=gen)
        noisy, is_masked, p = rediff.forward_mask(b.ids, b.answer_mask, tok.mask_id, generator=gen)
        rows = torch.arange(b.ids.shape[0])[:, None] < n_attr
        is_masked = torch.where(rows, attr_masked, is_masked)
        noisy = b.ids.masked_fill(is_masked, tok.mask_id)
        logits = model(noisy, emb)
        ce = F.cross_entropy(logits.flatten(0, 1), b.ids.flatten(), reduction="none").view_as(b.ids)
        w = torch.isin(b.ids, content_ids).float() * is_masked * rows
        l_attr = (ce * w).sum() / w.sum().clamp(min=1)
        l_eq1 = (ce * is_masked * ~rows / p[:, None]).sum() / (b.answer_mask & ~rows).sum().clamp(min=1)
        loss = a.mix * l_attr + (1 - a.mix) * l_eq1
    elif step < a.attr_mask:
        noisy, is_masked, p = rediff.mask_words(b.ids, b.answer_mask, attr_ids, tok.mask_id, generator=gen)
    else:
        noisy, is_masked, p = rediff.forward_mask(b.ids, b.answer_mask, tok.mask_id, generator=gen)
    if not a.mix:
        logits = model(noisy, emb)
        ce = F.cross_entropy(logits.flatten(0, 1), b.ids.flatten(), reduction="none").view_as(b.ids)
        if a.loss == "content" or step < a.attr_mask:
            w = torch.isin(b.ids, content_ids).float()
            loss = (ce * w * is_masked).sum() / (w * is_masked).sum().clamp(min=1)
        else:
            loss = (ce * is_masked / p[:, None]).sum() / b.answer_mask.sum()
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    if (step + 1) in a.eval_at:
        report(step + 1, full=a.full_evals)
    if step + 1 == a.stop:
        break
report(step + 1, full=True)
print("wall", round(time.time() - t0), flush=True)
