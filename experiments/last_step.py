"""experiments/last_step.py: are the garbled sentences of fast decoding the ones finished at the
last step? Exploratory.

With the refining sampler (Section 3.4) every visible token is re-predicted at every step, except
the tokens committed at the last step: nothing comes after them. At 8 tokens per step a 48-token
answer takes 6 steps, so 8 of its 48 positions (17 %) are committed unrevised; the paper's
128-token answers at 16 steps leave 6 %. For each checkpoint this captions held-out test scenes
(tools/eval.py's), splits every caption into sentences, and reports, for sentences that parse and
those that do not (data/score.py), the share holding a token committed at the last step. Then it
asks what revising those tokens would be worth: the headline (data/score.py) of the captions as
they are (S steps), after one extra forward pass that re-predicts every answer token and commits
nothing (caption_with_a_final_pass: S + 1 passes; not the paper's sampler), and of the ordinary
sampler given S + 1 steps (as many forward passes).

    python experiments/last_step.py --ckpt runs/repro/stage1-s0.safetensors [more ...] \
        --tokens-per-step 8 --n 200
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from data import shapes  # noqa: E402
import rediff  # noqa: E402
from data.pipeline import held_out_indices, image_to_tensor, prompt_ids  # noqa: E402
from data.score import score_caption, score_captions  # noqa: E402
from data.tokenizer import tokenizer_from_dict  # noqa: E402
from model import load_for  # noqa: E402
from sample import ModelLogits, banned_ids, caption_images, decode_answer, steps_for  # noqa: E402


def sentence_spans(ids: list[int], period: int, eos: int) -> list[tuple[int, int]]:
    """[start, end) spans of an answer's sentences (each ending at a period), cut at end-of-text."""
    spans, start = [], 0
    for k, t in enumerate(ids):
        if t == eos:
            break
        if t == period:
            spans.append((start, k + 1))
            start = k + 1
    end = ids.index(eos) if eos in ids else len(ids)
    if start < end:
        spans.append((start, end))  # a last sentence without its period
    return spans


@torch.no_grad()
def caption_with_a_final_pass(model, tokenizer, images, answer_len: int, tokens_per_step: int):
    """Not the paper's sampler: caption_images' refining sampler (one block), then one more forward
    pass after its last step that re-predicts every visible answer token and commits nothing, so
    the last step's tokens are revised too. Answer ids (B, G)."""
    device = next(model.parameters()).device
    image_embeds = model.encode_images(images.to(device))                          # (B, N, D)
    prompt = torch.tensor(prompt_ids(tokenizer, model.n_image_tokens), device=device)
    P, mask_id = len(prompt), tokenizer.mask_id
    x = torch.full((len(images), P + answer_len), mask_id, device=device)          # (B, L)
    x[:, :P] = prompt
    predict = rediff.step_predictor(ModelLogits(model, image_embeds, P), P, mask_id,
                                    banned_ids(tokenizer))
    stops = rediff.EndOfText(tokenizer.eos_id, x, P, mask_id)
    for _ in rediff.denoise_steps(predict, x, P, 1, steps_for(answer_len, tokens_per_step),
                                  mask_id, refine=True, stops=stops):
        pass  # the paper's refining sampler, step by step
    x0, _ = predict(x, P, x.shape[1])                                               # (B, G)
    x[:, P:] = torch.where(x[:, P:] != mask_id, x0, x[:, P:])  # visible tokens only
    return stops.answer(x)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", nargs="+", required=True, help="checkpoints to caption with")
    ap.add_argument("--tokens-per-step", type=int, default=8, help="tokens committed per step")
    ap.add_argument("--n", type=int, default=200, help="held-out test scenes")
    ap.add_argument("--seed", type=int, default=0, help="held-out scenes (tools/eval.py --seed)")
    args = ap.parse_args()
    for path in args.ckpt:
        needs = ("tokenizer", "world", "answer_len")
        model, meta = load_for(path, "last_step.py --ckpt", needs=needs)
        model.eval()
        tokenizer, answer_len = tokenizer_from_dict(meta["tokenizer"]), meta["answer_len"]
        world, vision = shapes.WorldConfig(**meta["world"]), model.cfg.vision
        samples = [shapes.sample("test", i, world) for i in held_out_indices(args.n, args.seed)]
        images = image_to_tensor([s["image"] for s in samples], vision.mean, vision.std)
        (ids, trace), _ = caption_images(model, tokenizer, images, answer_len, args.tokens_per_step,
                                         True, return_trace=True)
        last_new = trace[-1]["new"]                                       # (B, G) committed last
        period = tokenizer.encode(".")[0]
        counts = {True: [0, 0], False: [0, 0]}  # parses -> [sentences, with a last-step token]
        for row, sample in enumerate(samples):
            answer = ids[row].tolist()
            for a, b in sentence_spans(answer, period, tokenizer.eos_id):
                text = tokenizer.decode(answer[a:b])
                parses = score_caption(text, sample["scene"])["syntax"] == 1.0
                counts[parses][0] += 1
                counts[parses][1] += int(last_new[row, a:b].any())
        scenes = [sample["scene"] for sample in samples]
        texts = lambda answers: [decode_answer(tokenizer, a) for a in answers]  # noqa: E731
        headline = lambda answers: score_captions(texts(answers), scenes)["headline"]  # noqa: E731
        steps = len(trace)
        # tokens per step that take S + 1 steps
        per_step = [k for k in range(1, answer_len + 1) if steps_for(answer_len, k) == steps + 1]
        more = caption_images(model, tokenizer, images, answer_len, per_step[0], True)[0] \
            if per_step else None
        polished = caption_with_a_final_pass(model, tokenizer, images, answer_len,
                                             args.tokens_per_step)
        share = lambda c: c[1] / max(1, c[0])  # noqa: E731
        print(f"{path}: {args.tokens_per_step} tok/step, {len(trace)} steps | sentences that "
              f"parse: {counts[True][0]}, {share(counts[True]):.0%} hold a last-step token | that "
              f"do not: {counts[False][0]}, {share(counts[False]):.0%}\n    headline: {steps} "
              f"steps {headline(ids):.1f} | + one re-prediction pass {headline(polished):.1f} | "
              f"{steps + 1} steps {headline(more) if more is not None else float('nan'):.1f}")


if __name__ == "__main__":
    main()
