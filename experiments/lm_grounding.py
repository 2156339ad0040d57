"""experiments/lm_grounding.py: can the toy language model learn to read image tokens at all? Exploratory (not the
method): the project's LLaDA class fed *perfect* per-cell attribute one-hots (no vision tower), so only the language
model and its loss are tested. Prints the loss and the colour probe (own / next scene's features) every 100 steps,
and scores 1-token/step captions at --eval-at steps and at the end. The README's table "A loss that lets the toy
model read the image" came from these runs (2 in parallel, 1 thread each, ~0.2 s/step):
    PYTHONPATH=. python experiments/lm_grounding.py --max-objects 1 --steps 600 --lr 6e-3          # Eq. 1
    ... --max-objects 1 --steps 600 --freeze-proj | --abspos | --init 0.05 | --lr 5e-4
    ... --max-objects 1 --steps 300 --loss plain | content | content+eq1 | content+eos | content+struct [--sw 0.1]
    ... --max-objects 1 --steps 400 --diag 50                                                     # attention on images
    ... --steps 1500 --loss bal --block 16 --eval-at 750 [--seed 1]        # 1-4 objects; bal_t keeps the 1/t weights
"""
import argparse, json, math, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
import rediff
from data import shapes
from data.pipeline import answer_ids, prompt_ids
from data.tokenizer import WordTokenizer
from data.score import score_captions
from model import LMConfig, LLaDA
from model import apply_rope, rope_tables
from sample import banned_ids, decode_answer
def image_attention(lm, x, N, P):
    cos, sin = rope_tables(x.shape[1], lm.cfg.head_dim, lm.cfg.rope_theta, x.device)
    out = []
    for layer in lm.layers:
        h = layer.input_layernorm(x); at = layer.self_attn; B, L, _ = h.shape
        q = at.q_proj(h).view(B, L, at.n_heads, at.head_dim).transpose(1, 2)
        k = at.k_proj(h).view(B, L, at.n_heads, at.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        w = (q @ k.transpose(-1, -2) / at.head_dim ** 0.5).softmax(-1)  # (B,H,L,L)
        out.append(w[:, :, P:, :N].sum(-1).mean((0, 2)))  # (H,)
        x = layer(x, cos, sin)
    return torch.stack(out)  # (layers, H)

ap = argparse.ArgumentParser()
ap.add_argument("--feat", default="add"); ap.add_argument("--steps", type=int, default=1000)
ap.add_argument("--batch", type=int, default=32); ap.add_argument("--d", type=int, default=128)
ap.add_argument("--layers", type=int, default=4); ap.add_argument("--heads", type=int, default=4)
ap.add_argument("--lr", type=float, default=2e-3); ap.add_argument("--eval-at", type=int, nargs="*", default=[])
ap.add_argument("--answer-len", type=int, default=64); ap.add_argument("--init", type=float, default=1.0)
ap.add_argument("--seed", type=int, default=0); ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--max-objects", type=int, default=4); ap.add_argument("--block", type=int, default=0)
ap.add_argument("--neval", type=int, default=100); ap.add_argument("--loss", default="eq1"); ap.add_argument("--diag", type=int, default=0); ap.add_argument("--freeze-proj", action="store_true"); ap.add_argument("--warm", type=int, default=0); ap.add_argument("--abspos", action="store_true"); ap.add_argument("--sw", type=float, default=1.0)
a = ap.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
tok = WordTokenizer.for_shapes_world()
world = shapes.WorldConfig(image_size=48, max_words=a.answer_len - 1, max_objects=a.max_objects)
N = 9
def cell_feats(scene):
    f = torch.zeros(N, 16); f[:, 0] = 1; f[:, 6] = 1; f[:, 13] = 1
    for o in scene["objects"]:
        c = o["row"] * 3 + o["col"]; f[c] = 0
        f[c, 1 + shapes.SHAPES.index(o["shape"])] = 1; f[c, 7 + shapes.COLOURS.index(o["colour"])] = 1
        f[c, 14 + shapes.SIZES.index(o["size"])] = 1
    return f
class Proj(nn.Module):
    def __init__(s, mode, d):
        super().__init__(); s.mode = mode
        din = {"add": 25, "outer": 16 * 9, "gated": 25, "outer2": 16*9+25}[mode]
        s.lin = nn.Linear(din, d); nn.init.normal_(s.lin.weight, std=a.init); nn.init.zeros_(s.lin.bias)
    def forward(s, f):  # (B, N, 16)
        cells = torch.eye(N).expand(len(f), -1, -1)
        occ = 1 - f[..., :1]
        if s.mode == "add": x = torch.cat([f, cells], -1)
        elif s.mode == "gated": x = torch.cat([f, cells * occ], -1)
        elif s.mode == "outer": x = (f.unsqueeze(-1) * cells.unsqueeze(-2)).flatten(-2)
        else: x = torch.cat([(f.unsqueeze(-1) * cells.unsqueeze(-2)).flatten(-2), f, cells*occ], -1)
        return s.lin(x)
class M(nn.Module):
    def __init__(s):
        super().__init__()
        s.lm = LLaDA(LMConfig(vocab_size=tok.vocab_size, d_model=a.d, n_layers=a.layers, n_heads=a.heads, mlp_hidden=int(a.d*8/3)//16*16))
        for m in s.lm.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)): nn.init.normal_(m.weight, std=0.02)
        s.proj = Proj(a.feat, a.d)
        s.pos = nn.Parameter(torch.randn(200, a.d) * 0.02)
    def forward(s, ids, img, logits_from=0):
        x = s.lm.embed_tokens(ids)
        x = torch.cat([s.proj(img), x[:, N:]], 1)
        if a.abspos: x = x + s.pos[:x.shape[1]]
        return s.lm(x, logits_from=logits_from)
model = M()
if a.freeze_proj: model.proj.requires_grad_(False)
prompt = prompt_ids(tok, N); P = len(prompt)
train = [shapes.make_scene(shapes.scene_rng("train", i), world) for i in range(20000)]
CONTENT = torch.tensor([tok.encode(w)[0] for w in shapes.COLOURS + shapes.SHAPES + shapes.SIZES + shapes.POSITIONS])
TF = torch.stack([cell_feats(s) for s in train])
test_idx = list(range(a.neval)); test = [shapes.make_scene(shapes.scene_rng("test", i), world) for i in test_idx]
TEF = torch.stack([cell_feats(s) for s in test])
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
def evaluate(tps=1):
    model.eval()
    with torch.no_grad():
        pr = torch.tensor(prompt).expand(len(test), -1)
        fn = lambda ids: model(ids, TEF, logits_from=P)
        class LF:
            def __call__(s, ids): return model(ids, TEF, logits_from=s.start)
            def begin(s, st): s.start = st
        lf = LF(); lf.start = P
        bl = a.block or a.answer_len
        out = rediff.generate(lf, pr, a.answer_len, a.answer_len // tps, block_length=bl, refine=False,
            mask_id=tok.mask_id, stop_id=tok.eos_id, banned_ids=banned_ids(tok), on_block=lf.begin)
        texts = [decode_answer(tok, r) for r in out]
    model.train()
    sc = score_captions(texts, test)
    sc["words"] = sum(len(t.split()) for t in texts) / len(texts); sc["ex"] = texts[:2]
    return sc
COL = torch.tensor([tok.encode(w)[0] for w in shapes.COLOURS])
def probe():
    rng = np.random.default_rng(123)
    ids = torch.tensor([prompt + answer_ids(tok, shapes.make_caption(s, rng, world), a.answer_len) for s in test])
    hid = torch.isin(ids, COL); hid[:, :P] = False
    m = ids.masked_fill(hid, tok.mask_id)
    with torch.no_grad():
        own = (model(m, TEF).argmax(-1)[hid] == ids[hid]).float().mean().item()
        oth = (model(m, TEF.roll(1, 0)).argmax(-1)[hid] == ids[hid]).float().mean().item()
    return round(own, 3), round(oth, 3)
t0 = time.time()
for step in range(a.steps):
    lr = a.lr * min(1, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, max(0, step - 100) / (a.steps - 100)))))
    for g in opt.param_groups: g["lr"] = lr
    rng = np.random.default_rng([a.seed, step])
    idx = rng.integers(len(train), size=a.batch)
    ids = torch.tensor([prompt + answer_ids(tok, shapes.make_caption(train[i], rng, world), a.answer_len) for i in idx])
    am = torch.zeros_like(ids, dtype=torch.bool); am[:, P:] = True
    noisy, ism, p = rediff.forward_mask(ids, am, tok.mask_id)
    logits = model(noisy, TF[idx])
    if a.loss == "eq1" and step >= a.warm: loss = rediff.masked_diffusion_loss(logits, ids, ism, p, am)
    else:
        content = torch.isin(ids, CONTENT) & ism
        loss = F.cross_entropy(logits[content], ids[content])
        if a.loss.startswith("bal"):
            w = (1 / p[:, None]).expand_as(ids) if a.loss == "bal_t" else torch.ones_like(ids, dtype=torch.float)
            ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
            eos = (ids == tok.eos_id) & ism; st = ism & ~eos & ~content
            loss = sum((ce * w)[m].sum() / m.sum().clamp(min=1) for m in (content, st, eos))
        if a.loss == "plain": loss = F.cross_entropy(logits[ism], ids[ism])
        if a.loss == "content+eq1": loss = loss + rediff.masked_diffusion_loss(logits, ids, ism, p, am)
        if a.loss == "content+eos":
            e = (ids == tok.eos_id) & ism; loss = loss + F.cross_entropy(logits[e], ids[e])
        if a.loss == "content+struct":
            e = (ids != tok.eos_id) & ism & ~content; loss = loss + a.sw * F.cross_entropy(logits[e], ids[e])
    if a.diag and step % a.diag == 0:
        with torch.no_grad():
            x = model.lm.embed_tokens(noisy); x = torch.cat([model.proj(TF[idx]), x[:, N:]], 1)
            print("attn", step, [[round(v, 3) for v in r] for r in image_attention(model.lm, x, N, P).tolist()], flush=True)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 100 == 0: print(step, round(loss.item(), 3), round(time.time() - t0, 1), 'probe', probe(), flush=True)
    if step + 1 in a.eval_at:
        sc = evaluate(); print(json.dumps({"step": step + 1, "t": round(time.time() - t0), **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in sc.items() if k in ("headline","factuality","coverage","syntax","words","ex")}}), flush=True)
sc = evaluate(); print(json.dumps({"step": a.steps, "final": 1, "t": round(time.time() - t0), **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in sc.items() if k in ("headline","factuality","coverage","syntax","repetition","words","ex")}}), flush=True)
