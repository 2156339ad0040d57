"""workshop/check.py: checks the workshop's exercises and says in words what is right and wrong.

    python workshop/check.py 3                 # exercise 3 (workshop/ex3_refining_sampler.py)
    python workshop/check.py --all             # every exercise
    python workshop/check.py --all --solution  # the same checks on the project's own functions

Each exercise's checks are hand-computed cases (worked out in the comments beside them) and
agreement with the project's own function on random inputs. A failed check says what was
expected, what came, and a hint; an exception raised by an exercise's code is reported in one
line. Exit status: 0 when every check passed, 1 when one did not, 2 for a bad command line.
"""
import importlib
import logging
import math
import os
import random
import sys
import traceback
from collections import Counter
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python workshop/check.py`: the project's modules are importable
try:
    import torch
except ImportError:
    sys.exit("check.py: torch is not installed in this Python: run `make setup`, then "
             ".venv/bin/python workshop/check.py N")
import rediff  # noqa: E402
from workshop.todo import Todo  # noqa: E402

logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # transformers' import warns there

EXERCISES = {1: ("ex1_forward_process", "the forward process and Eq. 1"),
             2: ("ex2_reverse_process", "one step of LLaDA's reverse process"),
             3: ("ex3_refining_sampler", "the refining rule of Section 3.4"),
             4: ("ex4_stage1", "Stage I's typed losses, Eq. 2-3"),
             5: ("ex5_stage2", "Stage II: kept pairs, mistake mask, Eq. 4"),
             6: ("ex6_scale", "a real-format checkpoint and the cost of an 8B caption")}
CHECKS: dict = {n: [] for n in EXERCISES}  # exercise -> [(title, check function)]
LN2, LN4 = math.log(2.0), math.log(4.0)


class Wrong(Exception):
    """A check's finding, already in words: what was expected, what came, a hint."""


def check(n: int, title: str):
    """Registers the decorated function as a check of exercise n; it gets the functions to test."""
    def register(fn):
        CHECKS[n].append((title, fn))
        return fn
    return register

# ------------------------------------------------------------------------------------------------
# Comparing what came with what was expected


def fmt(x) -> str:
    """A short, readable form of a tensor or a number."""
    if torch.is_tensor(x):
        if x.dtype.is_floating_point:
            values = [round(v, 6) for v in x.flatten().tolist()] if x.dim() else round(x.item(), 6)
            return str(values)
        return str(x.tolist())
    return repr(round(x, 6) if isinstance(x, float) else x)


def with_hint(hint: str) -> str:
    return f" Hint: {hint}" if hint else ""


def tensor_like(got, expected, what: str):
    """got must be a tensor of expected's shape (a bool tensor where a mask is expected)."""
    if got is None:
        raise Wrong(f"{what}: expected a tensor, got None (does the function return its result?)")
    if not torch.is_tensor(got):
        raise Wrong(f"{what}: expected a tensor, got a {type(got).__name__}")
    if tuple(got.shape) != tuple(expected.shape):
        raise Wrong(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    if expected.dtype == torch.bool and got.dtype != torch.bool:
        raise Wrong(f"{what}: expected True/False values (a bool tensor), got dtype {got.dtype}")


def same(got, expected, what: str, hint: str = ""):
    """Equal tensors (floats to 1e-5 relative)."""
    tensor_like(got, expected, what)
    if expected.dtype.is_floating_point:
        equal = torch.allclose(got.double(), expected.double(), rtol=1e-5, atol=1e-6)
    else:
        equal = torch.equal(got.long(), expected.long())
    if equal:
        return
    if expected.numel() <= 24:
        raise Wrong(f"{what}: expected {fmt(expected)}, got {fmt(got)}.{with_hint(hint)}")
    worst = (got.double() - expected.double()).abs().flatten().argmax()
    index = tuple(int(i) for i in torch.unravel_index(worst, expected.shape))
    raise Wrong(f"{what}: differs from what was expected, e.g. at index {index}: expected "
                f"{fmt(expected[index])}, got {fmt(got[index])}.{with_hint(hint)}")


def number(got, what: str) -> float:
    """A Python float from a number or a one-element tensor."""
    if torch.is_tensor(got) and got.numel() == 1:
        return got.item()
    if isinstance(got, (int, float)) and not isinstance(got, bool):
        return float(got)
    kind = f"a tensor of shape {tuple(got.shape)}" if torch.is_tensor(got) else repr(got)
    raise Wrong(f"{what}: expected a number (or a one-element tensor), got {kind}")


def close(got, expected: float, what: str, hint: str = "", known_wrong: dict | None = None):
    """got ~ expected (1e-5 relative). known_wrong {value: meaning}: common mistakes' values."""
    value = number(got, what)
    if math.isclose(value, expected, rel_tol=1e-5, abs_tol=1e-7):
        return
    for wrong_value, meaning in (known_wrong or {}).items():
        if math.isclose(value, wrong_value, rel_tol=1e-5, abs_tol=1e-7):
            hint = meaning
    raise Wrong(f"{what}: expected {expected:.6f}, got {value:.6f}.{with_hint(hint)}")


def exact(got, expected, what: str, hint: str = ""):
    if got != expected:
        raise Wrong(f"{what}: expected {expected!r}, got {got!r}.{with_hint(hint)}")

# ------------------------------------------------------------------------------------------------
# The project's own functions with each exercise's signature: the reference, and --solution


def project_step(x, logits, mask_id: int, steps: int, refine: bool):
    """The first step of the project's sampler (rediff.generate) on the answer x (B, G)."""
    _, trace = rediff.generate(lambda ids: logits, x[:, :0], x.shape[1], steps, mask_id=mask_id,
                               draft=x, refine=refine, return_trace=True)
    return trace[0]["ids"]


def project_parameters(cfg) -> int:
    """The parameter count of the project's model.LLaDA(cfg), built on the meta device."""
    from model import LLaDA
    with torch.device("meta"):
        return sum(p.numel() for p in LLaDA(cfg).parameters())


def project_flops(cfg, seq_len: int) -> int:
    """FLOPs of one forward pass of the project's model.LLaDA(cfg) over seq_len tokens, counted
    by PyTorch's FlopCounterMode on the meta device (every matrix product; nothing computed)."""
    from torch.utils.flop_counter import FlopCounterMode
    from model import LLaDA
    with torch.device("meta"):
        model = LLaDA(cfg)
        embeds = torch.zeros(1, seq_len, cfg.d_model)                         # (1, L, D)
    with FlopCounterMode(display=False) as counter:
        model(embeds)
    return counter.get_total_flops()


def solution(n: int) -> dict:
    """{function name: the project's implementation} for exercise n."""
    from experts import validate_pairs
    from train_stage2 import apply_corrections
    return {
        1: {"forward_mask": rediff.forward_mask,
            "masked_diffusion_loss": rediff.masked_diffusion_loss},
        2: {"commit_step": lambda x, logits, mask_id, steps:
            project_step(x, logits, mask_id, steps, False)},
        3: {"refining_step": lambda x, logits, mask_id, steps:
            project_step(x, logits, mask_id, steps, True)},
        4: {"typed_losses": lambda logits, labels, types, p:
            rediff.typed_losses(logits, labels, types, p)},
        5: {"keep_pairs": lambda pairs, draft, tokenizer:
            validate_pairs(pairs, draft, tokenizer, Counter()),
            "build_targets": apply_corrections,
            "refinement_loss": lambda logits, refined, mistake:
            rediff.refinement_loss(logits, refined, mistake)},
        6: {"lm_parameters": project_parameters, "forward_flops": project_flops}}[n]


def load(n: int):
    """The exercise's module, freshly imported (an attendee edits it between runs)."""
    name = f"workshop.{EXERCISES[n][0]}"
    if name in sys.modules:
        return importlib.reload(sys.modules[name])
    return importlib.import_module(name)

# ------------------------------------------------------------------------------------------------
# Exercise 1: the forward process and Eq. 1


@check(1, "forward_mask at t = 1 masks the whole answer and never the prompt")
def _(f):
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    answer = torch.tensor([[False, False, True, True, True]] * 2)
    noisy, is_masked, _ = f.forward_mask(ids, answer, 1, eps=1.0,
                                         generator=torch.Generator().manual_seed(0))
    same(is_masked, answer, "is_masked at t = 1",
         "when p = 1 every answer position is masked, and the prompt never is")
    same(noisy, torch.tensor([[5, 6, 1, 1, 1], [9, 8, 1, 1, 1]]), "the noisy ids (mask_id = 1)",
         "mask_id where is_masked, the original id elsewhere")


@check(1, "forward_mask draws the same masks as the project's rediff.forward_mask (same seed)")
def _(f):
    for seed in range(5):
        ids = torch.randint(5, 50, (4, 16), generator=torch.Generator().manual_seed(100 + seed))
        answer = torch.zeros_like(ids, dtype=torch.bool)
        answer[:, 4 + seed:] = True
        want = rediff.forward_mask(ids, answer, 2, generator=torch.Generator().manual_seed(seed))
        got = f.forward_mask(ids, answer, 2, generator=torch.Generator().manual_seed(seed))
        if not isinstance(got, tuple) or len(got) != 3:
            raise Wrong("forward_mask must return three things: (noisy ids, is_masked, p)")
        same(got[1], want[1], f"is_masked (seed {seed})",
             "masked where draws < p[:, None] (one p per row), and only where answer_mask is True")
        same(got[0], want[0], f"the noisy ids (seed {seed})",
             "mask_id where is_masked, the original id elsewhere")


# The 3-token example (the exercise's demo): prompt 1 token, answer 3, vocabulary {0, 1};
# positions 1 and 3 masked. Position 1: logits (0, 0), CE ln 2. Position 3: logits (ln 3, 0),
# target 0, probability 3/4, CE ln 4/3. Eq. 1 at t = 0.5: (ln 2 + ln 4/3) / 0.5 / 3 (the
# answer length) = 2 ln(8/3) / 3 = 0.653886.
THREE = dict(logits=torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [math.log(3.0), 0.0]]]),
             targets=torch.tensor([[1, 0, 1, 0]]),
             is_masked=torch.tensor([[False, True, False, True]]),
             answer_mask=torch.tensor([[False, True, True, True]]))


@check(1, "Eq. 1 on the 3-token example is 0.653886 at t = 0.5, and half of it at t = 1")
def _(f):
    ce_sum = LN2 + math.log(4 / 3)
    for t in (0.5, 1.0):
        got = f.masked_diffusion_loss(THREE["logits"], THREE["targets"], THREE["is_masked"],
                                      torch.tensor([t]), THREE["answer_mask"])
        close(got, ce_sum / t / 3, f"Eq. 1 at t = {t}",
              "only masked positions count, each divided by t; then divide by the answer length, 3",
              {ce_sum / 3: "the 1/t weight is missing",
               ce_sum / t / 2: "divide by the answer length (3), not by the masked count (2)",
               ce_sum / t: "divide each row's sum by its answer length",
               (ce_sum + LN2) / t / 3: "an unmasked answer token was counted: only masks count"})


@check(1, "Eq. 1 is 0 when nothing is masked")
def _(f):
    got = f.masked_diffusion_loss(THREE["logits"], THREE["targets"],
                                  torch.zeros_like(THREE["is_masked"]), torch.tensor([0.5]),
                                  THREE["answer_mask"])
    close(got, 0.0, "Eq. 1 with no masked token", "only masked positions contribute")


@check(1, "Eq. 1 agrees with the project's rediff.masked_diffusion_loss on random batches")
def _(f):
    g = torch.Generator().manual_seed(1)
    for trial in range(5):
        B, L, V = 4, 12, 7
        logits = torch.randn(B, L, V, generator=g)
        targets = torch.randint(V, (B, L), generator=g)
        answer = torch.arange(L)[None, :] >= torch.randint(1, 8, (B, 1), generator=g)  # 5-11
        is_masked = (torch.rand(B, L, generator=g) < 0.5) & answer
        p = torch.rand(B, generator=g) * 0.9 + 0.1
        want = rediff.masked_diffusion_loss(logits, targets, is_masked, p, answer).item()
        close(f.masked_diffusion_loss(logits, targets, is_masked, p, answer), want,
              f"random batch {trial}", "each row: the sum of CE / t over its masked tokens, "
              "divided by the row's answer length; then the mean over rows")

# ------------------------------------------------------------------------------------------------
# Exercises 2 and 3: one sampler step. Vocabulary 5, mask_id 4 (never predicted: logit -inf).


M = 4  # mask_id of the sampler checks
# Probabilities of tokens 0-3 at each answer position: the argmax and its probability decide.
STEP_PROBS = [[[0.01, 0.97, 0.01, 0.01],   # row 0, visible (token 3): the model prefers 1 (0.97)
               [0.20, 0.60, 0.10, 0.10],   # 1 at 0.6
               [0.04, 0.03, 0.90, 0.03],   # 2 at 0.9  <- committed (most confident mask)
               [0.50, 0.20, 0.20, 0.10],   # 0 at 0.5
               [0.10, 0.10, 0.10, 0.70]],  # 3 at 0.7  <- committed (second)
              [[0.40, 0.30, 0.20, 0.10],   # row 1: 0 at 0.4
               [0.10, 0.80, 0.05, 0.05],   # visible (token 1): the model agrees
               [0.10, 0.10, 0.70, 0.10],   # visible (token 0): the model prefers 2
               [0.05, 0.05, 0.85, 0.05],   # visible (token 2): the model agrees
               [0.05, 0.05, 0.05, 0.85]]]  # 3 at 0.85 <- committed (2 masks in the row: k = 1)
STEP_X = torch.tensor([[3, M, M, M, M], [M, 1, 0, 2, M]])
STEP_STEPS = 2  # row 0: 4 masks over 2 steps, k = 2 now; row 1: 2 masks over 2 steps, k = 1


def step_logits(probs) -> torch.Tensor:
    """Logits (B, G, 5) whose softmax over tokens 0-3 is `probs`; the mask column is -inf."""
    logits = torch.tensor(probs).log()                                        # (B, G, 4)
    return torch.cat([logits, torch.full((*logits.shape[:2], 1), -math.inf)], dim=-1)


def random_step_case(g, B=3, G=10, V=7):
    """A random answer (some positions visible), its logits (the mask id V - 1 is never
    predicted) and the steps left."""
    x = torch.randint(V - 1, (B, G), generator=g)
    x[torch.rand(B, G, generator=g) < 0.6] = V - 1
    logits = torch.randn(B, G, V, generator=g) * 2
    logits[..., V - 1] = -math.inf
    steps = int(torch.randint(1, 5, (1,), generator=g))
    return x, logits, V - 1, steps


@check(2, "the hand example: row 0 commits its 2 most confident masks, row 1 its 1")
def _(f):
    got = f.commit_step(STEP_X.clone(), step_logits(STEP_PROBS), M, STEP_STEPS)
    same(got, torch.tensor([[3, M, 2, M, 3], [M, 1, 0, 2, 3]]), "the answer (4: mask)",
         "k = 2 in row 0 and 1 in row 1; only masked positions compete (visible ones get "
         "confidence -inf), and the most confident ones take their argmax")


@check(2, "visible tokens never change and never take a commit (the frozen sampler)")
def _(f):
    g = torch.Generator().manual_seed(2)
    for trial in range(10):
        x, logits, mask_id, steps = random_step_case(g)
        got = f.commit_step(x.clone(), logits, mask_id, steps)
        tensor_like(got, x, "the answer after the step")
        visible = x != mask_id
        if not torch.equal(got[visible], x[visible]):
            raise Wrong(f"random case {trial}: expected the visible tokens of {fmt(x)} unchanged, "
                        f"got {fmt(got)}. Hint: give visible positions confidence -inf, so that "
                        f"top-k never picks them")


@check(2, "each row commits exactly its transfer_schedule count")
def _(f):
    g = torch.Generator().manual_seed(3)
    for trial in range(10):
        x, logits, mask_id, steps = random_step_case(g)
        got = f.commit_step(x.clone(), logits, mask_id, steps)
        tensor_like(got, x, "the answer after the step")
        want = rediff.transfer_schedule((x == mask_id).sum(dim=1), steps)[:, 0]
        done = ((x == mask_id) & (got != mask_id)).sum(dim=1)
        same(done, want, f"tokens committed per row (random case {trial})",
             "commit k[row] positions in each row")


@check(2, "agrees with the project's sampler (rediff.generate, one step) on random cases")
def _(f):
    g = torch.Generator().manual_seed(4)
    for trial in range(10):
        x, logits, mask_id, steps = random_step_case(g)
        same(f.commit_step(x.clone(), logits, mask_id, steps),
             project_step(x, logits, mask_id, steps, False), f"random case {trial}",
             "commit the k most confident masked positions, with their argmax")


@check(3, "the hand example: commits as in exercise 2, every visible token takes the argmax")
def _(f):
    got = f.refining_step(STEP_X.clone(), step_logits(STEP_PROBS), M, STEP_STEPS)
    same(got, torch.tensor([[1, M, 2, M, 3], [M, 1, 2, 2, 3]]), "the answer (4: mask)",
         "row 0: the visible 3 becomes the model's 1; row 1: the visible 0 becomes 2; the masks "
         "that are not committed stay masked")


@check(3, "masked positions that are not committed stay masked")
def _(f):
    g = torch.Generator().manual_seed(5)
    for trial in range(10):
        x, logits, mask_id, steps = random_step_case(g)
        got = f.refining_step(x.clone(), logits, mask_id, steps)
        tensor_like(got, x, "the answer after the step")
        want = (project_step(x, logits, mask_id, steps, False) == mask_id).sum().item()
        exact((got == mask_id).sum().item(), want, f"masks left after the step (case {trial})",
              "only visible positions are revised; the masked ones are the frozen step's")


@check(3, "with no mask left, every token is re-predicted")
def _(f):
    x, logits, mask_id, _ = random_step_case(torch.Generator().manual_seed(6))
    x[x == mask_id] = 0
    same(f.refining_step(x.clone(), logits, mask_id, 1), logits.argmax(dim=-1),
         "the answer after the step", "every visible position takes this step's argmax")


@check(3, "agrees with the project's refining sampler (rediff.generate, refine=True, one step)")
def _(f):
    g = torch.Generator().manual_seed(7)
    for trial in range(10):
        x, logits, mask_id, steps = random_step_case(g)
        same(f.refining_step(x.clone(), logits, mask_id, steps),
             project_step(x, logits, mask_id, steps, True), f"random case {trial}",
             "positions visible before the step take x0; the others keep `committed`")

# ------------------------------------------------------------------------------------------------
# Exercise 4: Eq. 2-3, per row


# Two rows, vocabulary 4, logits 0: every CE is ln 4 = c. Position 0 of each row is the prompt.
# Row 0 (t = 0.5): mask, mask, syntax. Row 1 (t = 1): mask, clean, clean. Per row and type:
#   row 0: mask (2c / 0.5) / 2 = 2c, syntax (c / 0.5) / 1 = 2c;  row 1: mask c, clean 2c / 2 = c.
#   mask (2c + c) / 2 = 1.5c; syntax (2c + 0) / 2 = c; clean (0 + c) / 2 = 0.5c; total 3c.
# Pooled over the batch instead (a type's sum / its batch count): mask 5c/3, syntax 2c, clean c.
TYPED = dict(logits=torch.zeros(2, 4, 4), labels=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]),
             types=torch.tensor([[rediff.IGNORE, rediff.MASK, rediff.MASK, rediff.SYNTAX],
                                 [rediff.IGNORE, rediff.MASK, rediff.CLEAN, rediff.CLEAN]]),
             p=torch.tensor([0.5, 1.0]))
POOLED = "that is the pooled answer: divide each row by its own count, then average the rows"


def typed_parts(result, what: str) -> tuple:
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise Wrong(f"{what}: expected typed_losses to return (total, {{name: part}}), "
                    f"got {type(result).__name__}")
    missing = [name for name in rediff.TYPE_NAMES.values() if name not in result[1]]
    if missing:
        raise Wrong(f"{what}: expected the parts {list(rediff.TYPE_NAMES.values())}, got "
                    f"{list(result[1])}")
    return result


@check(4, "the hand example: mask 1.5 ln 4, syntax ln 4, clean 0.5 ln 4, hallucination 0")
def _(f):
    total, parts = typed_parts(f.typed_losses(**TYPED), "the hand example")
    c = LN4
    close(parts["mask"], 1.5 * c, "the mask part", "row 0: (2c / 0.5) / 2 = 2c, row 1: c",
          {5 * c / 3: POOLED, c: "the 1/t weight is missing"})
    close(parts["syntax"], c, "the syntax part",
          "row 0 has one syntax token (c / 0.5 = 2c), row 1 none (0): their mean is c",
          {2 * c: POOLED + " (a row without the type counts 0 in the mean)"})
    close(parts["clean"], 0.5 * c, "the clean part", "row 1: (c + c) / 2 = c, row 0 has none",
          {c: POOLED + " (a row without the type counts 0 in the mean)"})
    close(parts["hallucination"], 0.0, "the hallucination part", "no row has the type: 0")
    close(total, 3 * c, "the total", "the sum of the four parts")


@check(4, "no NaN when a type is missing from every row")
def _(f):
    types = torch.full((2, 4), rediff.MASK)
    total, parts = typed_parts(f.typed_losses(TYPED["logits"], TYPED["labels"], types,
                                              TYPED["p"]), "an all-mask batch")
    for name in ("syntax", "hallucination", "clean"):
        close(parts[name], 0.0, f"the {name} part of a batch without {name} tokens",
              "a row with count 0 gives 0: divide by count.clamp(min=1), or use torch.where")
    close(total, (LN4 / 0.5 + LN4) / 2, "the total of an all-mask batch")


@check(4, "agrees with the project's rediff.typed_losses on random batches")
def _(f):
    g = torch.Generator().manual_seed(8)
    for trial in range(5):
        B, L, V = 5, 12, 9
        logits = torch.randn(B, L, V, generator=g)
        labels = torch.randint(V, (B, L), generator=g)
        types = torch.randint(0, 5, (B, L), generator=g)   # IGNORE ... CLEAN, every type
        types[trial % B] = rediff.CLEAN                    # a row with clean tokens only
        p = torch.rand(B, generator=g) * 0.9 + 0.1
        want_total, want = rediff.typed_losses(logits, labels, types, p)
        total, parts = typed_parts(f.typed_losses(logits, labels, types, p), f"batch {trial}")
        for name in rediff.TYPE_NAMES.values():
            close(parts[name], want[name].item(), f"the {name} part of random batch {trial}",
                  "per row: the sum of CE / t over the row's tokens of the type, divided by "
                  "their number in the row; then the mean over rows")
        close(total, want_total.item(), f"the total of random batch {trial}")

# ------------------------------------------------------------------------------------------------
# Exercise 5: Stage II


def shapes_tokenizer():
    from data.tokenizer import WordTokenizer
    return WordTokenizer.for_shapes_world()


def demo_draft(tokenizer):
    """The exercise's draft: 17 words, then end-of-text up to 20 tokens."""
    from workshop.ex5_stage2 import ANSWER_LEN, DRAFT
    words = tokenizer.encode(DRAFT)
    return torch.tensor(words + [tokenizer.eos_id] * (ANSWER_LEN - len(words)))


def as_pairs(got):
    """The kept pairs as plain (int, [int]) tuples, for comparison."""
    if not isinstance(got, list):
        return got
    return [(int(start), [int(i) for i in target]) for start, target in got]


@check(5, "keep_pairs on the exercise's draft keeps 'red circle at the top' (at 3), 'left' (15)")
def _(f):
    from workshop.ex5_stage2 import EXPERT_PAIRS
    tok = shapes_tokenizer()
    want = [(3, tok.encode("blue circle at the top")), (15, tok.encode("bottom-left"))]
    exact(as_pairs(f.keep_pairs(EXPERT_PAIRS, demo_draft(tok), tok)), want,
          "the kept (start, target ids) pairs",
          "keep a pair when len(org) == len(target) and org occurs once (len(starts) == 1); "
          "'red circle' occurs twice, 'at the bottom left' has 4 tokens for 3, 'a green star' "
          "is not in the draft")


@check(5, "keep_pairs agrees with the project's experts.validate_pairs on random pairs")
def _(f):
    from data import shapes
    tok = shapes_tokenizer()
    rng = random.Random(9)
    vocabulary = sorted(shapes.VOCAB)
    for trial in range(40):
        caption = shapes.sample("test", trial)["caption"]
        ids = tok.encode(caption)
        draft = torch.tensor(ids + [tok.eos_id] * 4)
        n = rng.randint(1, 3)
        start = rng.randrange(len(ids) - n + 1)
        org = caption.split()[start:start + n]
        if rng.random() < 0.2:  # mostly a segment of the draft, sometimes random words
            org = rng.choices(vocabulary, k=n)
        target = list(org)
        while target == org:  # same length mostly, sometimes one more or one less
            target = rng.choices(vocabulary, k=n + rng.choice([0, 0, 0, 1, -1 if n > 1 else 1]))
        pair = {"org": " ".join(org), "target": " ".join(target)}
        want = solution(5)["keep_pairs"]([pair], draft, tok)
        exact(as_pairs(f.keep_pairs([pair], draft, tok)), want,
              f"the kept pairs for {pair} in the draft '{caption}'",
              "the same number of tokens, and org found exactly once in the draft")


@check(5, "build_targets writes the targets over the draft and marks them as mistakes")
def _(f):
    tok = shapes_tokenizer()
    kept = [(3, tok.encode("blue circle at the top")), (15, tok.encode("bottom-left"))]
    result = f.build_targets(demo_draft(tok), kept)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise Wrong("build_targets must return (refined ids, mistake mask)")
    refined = tok.encode("there is a blue circle at the top . a red circle is at the bottom-left .")
    same(result[0], torch.tensor(refined + [tok.eos_id] * 3), "the refined ids",
         "each target's ids written at draft[start:start + len(target)]")
    mistake = torch.zeros(20, dtype=torch.bool)
    mistake[3:8] = mistake[15] = True
    same(result[1], mistake, "the mistake mask", "True where a target is: 3 to 7, and 15")


@check(5, "build_targets agrees with the project's train_stage2.apply_corrections")
def _(f):
    from train_stage2 import apply_corrections
    rng = random.Random(10)
    for trial in range(20):
        draft = torch.tensor([rng.randrange(5, 40) for _ in range(16)])
        kept, start = [], rng.randrange(3)
        while start < 14:
            n = rng.randint(1, 3)
            kept.append((start, [rng.randrange(5, 40) for _ in range(min(n, 16 - start))]))
            start += n + rng.randint(1, 4)
        result = f.build_targets(draft.clone(), kept)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise Wrong("build_targets must return (refined ids, mistake mask)")
        want = apply_corrections(draft, kept)
        same(result[0], want[0], f"the refined ids of random case {trial}")
        same(result[1], want[1], f"the mistake mask of random case {trial}")


def eq4_case():
    """Three drafts, vocabulary 4, logits 0 (CE ln 4 = 1.386294) except draft 0, position 0,
    where the target has probability 7/10 (CE -ln 0.7 = 0.356675). Draft 0: one correction.
    Draft 1: three corrections, each ln 4. Draft 2: none, left out of the mean.
    Eq. 4 = (0.356675 + 1.386294) / 2 = 0.871485 (pooled: (0.356675 + 3 ln 4) / 4)."""
    logits = torch.zeros(3, 4, 4)
    logits[0, 0, 2] = math.log(7.0)
    refined = torch.tensor([[2, 0, 0, 0], [1, 2, 3, 0], [0, 0, 0, 0]])
    mistake = torch.tensor([[True, False, False, False], [True, True, True, False], [False] * 4])
    return logits, refined, mistake


@check(5, "Eq. 4 on three drafts (one fix, three, none) is 0.871485, and 0 without fixes")
def _(f):
    logits, refined, mistake = eq4_case()
    a, b = -math.log(0.7), LN4
    close(f.refinement_loss(logits, refined, mistake), (a + b) / 2, "Eq. 4 of the three drafts",
          "each draft's own mean over its corrected positions, then the mean over drafts 0, 1",
          {(a + 3 * b) / 4: "that is the pooled mean over all 4 corrected tokens: average each "
           "draft first", (a + b) / 3: "the draft without corrections is left out of the mean",
           (a + 3 * b) / 2: "divide each draft's sum by its own number of corrected tokens"})
    close(f.refinement_loss(logits, refined, torch.zeros_like(mistake)), 0.0,
          "Eq. 4 without corrections")


@check(5, "Eq. 4 agrees with the project's rediff.refinement_loss on random batches")
def _(f):
    g = torch.Generator().manual_seed(11)
    for trial in range(5):
        B, G, V = 6, 10, 8
        logits = torch.randn(B, G, V, generator=g)
        refined = torch.randint(V, (B, G), generator=g)
        mistake = torch.rand(B, G, generator=g) < 0.2
        mistake[trial] = False                                                # a draft without
        want = rediff.refinement_loss(logits, refined, mistake).item()
        close(f.refinement_loss(logits, refined, mistake), want, f"random batch {trial}",
              "per draft: the mean CE over its corrected positions; then the mean over the "
              "drafts that have one")

# ------------------------------------------------------------------------------------------------
# Exercise 6: scale


def real_lm_config():
    """The language model of the published LLaDA-V config.json (as the project's tests hold it)."""
    from llada_v import config_from_hf
    from tests.test_llada_v import REAL_CONFIG
    return config_from_hf(REAL_CONFIG).lm


def random_lm_configs():
    from model import LMConfig
    rng = random.Random(12)
    configs = []
    for _ in range(6):
        heads = rng.choice([2, 4, 8])
        configs.append(LMConfig(vocab_size=rng.randrange(20, 300),
                                d_model=heads * rng.choice([4, 8]),
                                n_layers=rng.randint(1, 4), n_heads=heads,
                                n_kv_heads=rng.choice([heads, heads // 2]),
                                mlp_hidden=rng.choice([24, 48, 96])))
    return configs


@check(6, "lm_parameters of LLaDA-V's language model is 8,014,639,104")
def _(f):
    # 32 x (4 x 4096^2 + 3 x 4096 x 12288 + 2 x 4096) + 2 x 126349 x 4096 + 4096
    exact(f.lm_parameters(real_lm_config()), 8_014_639_104, "lm_parameters(LLaDA-V)",
          "32 layers x (q, k, v, o: 4 x 4096^2; gate, up, down: 3 x 4096 x 12288; two norms: "
          "2 x 4096) + embedding and head 2 x 126349 x 4096 + the final norm 4096")


@check(6, "lm_parameters agrees with the project's model.LLaDA on random configs")
def _(f):
    for cfg in random_lm_configs():
        exact(f.lm_parameters(cfg), project_parameters(cfg), f"lm_parameters({cfg})",
              "with n_kv_heads < n_heads, k and v project to n_kv_heads x head_dim only")


@check(6, "lm_parameters agrees with the tiny real-format checkpoint that llada_v loads")
def _(f):
    import tempfile
    from llada_v import load_llada_v
    from workshop.ex6_scale import build_tiny_folder
    f.lm_parameters(real_lm_config())  # an unfinished lm_parameters stops here, before the build
    with tempfile.TemporaryDirectory() as root:
        model, _ = load_llada_v(build_tiny_folder(root))
    exact(f.lm_parameters(model.cfg.lm), sum(p.numel() for p in model.lm.parameters()),
          "lm_parameters of the loaded tiny checkpoint",
          "count every weight of model.lm as model.py builds it")


@check(6, "forward_flops on a hand example is 1,344")
def _(f):
    # d 4, 1 layer, 2 heads, MLP 8, vocabulary 10, 3 tokens: weight matrices 4 x 4^2 + 3 x 4 x 8
    # = 160, head 4 x 10 = 40: 2 x 200 x 3 = 1,200; attention 2 x 2 x 3^2 x 4 = 144; 1,344.
    from model import LMConfig
    cfg = LMConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=8)
    exact(f.forward_flops(cfg, 3), 1344, "forward_flops(the hand example, 3 tokens)",
          "2 x 200 weights x 3 tokens = 1,200, plus attention 4 x 1 layer x 3^2 x 4 = 144 "
          "(forward_flops uses your lm_parameters: check it first)")


@check(6, "forward_flops agrees with PyTorch's FLOP counter on the project's model (and 8B)")
def _(f):
    for cfg in random_lm_configs()[:3]:
        exact(f.forward_flops(cfg, 17), project_flops(cfg, 17), f"forward_flops({cfg}, 17)")
    exact(f.forward_flops(real_lm_config(), 3815), project_flops(real_lm_config(), 3815),
          "forward_flops(LLaDA-V, 3815 tokens)", "2 x weights x L + 4 x layers x L^2 x d_model")

# ------------------------------------------------------------------------------------------------
# Running the checks


def where_in_exercise(err: BaseException) -> str:
    """file:line of the deepest traceback frame in an exercise file (else the deepest frame)."""
    frames = traceback.extract_tb(err.__traceback__)
    workshop = os.path.join(ROOT, "workshop")
    mine = [fr for fr in frames if os.path.basename(fr.filename).startswith("ex")
            and os.path.dirname(os.path.abspath(fr.filename)) == workshop]
    frame = (mine or frames)[-1]
    path = frame.filename
    if path.startswith(ROOT):
        path = os.path.relpath(path, ROOT)
    return f"{path}:{frame.lineno}"


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else '(no message)'}"


def run_exercise(n: int, use_solution: bool = False, funcs=None) -> bool:
    """Runs exercise n's checks, one printed line each; True when all passed. The functions
    checked: the exercise file's, the project's (use_solution), or `funcs` (a namespace)."""
    name, title = EXERCISES[n]
    source = "the project's own functions" if use_solution else f"workshop/{name}.py"
    print(f"exercise {n}: {title} ({source if funcs is None else 'given functions'})")
    try:
        if funcs is None:
            funcs = SimpleNamespace(**solution(n)) if use_solution else load(n)
    except SyntaxError as err:
        print(f"  ERROR  workshop/{name}.py cannot be read: SyntaxError: {err.msg} "
              f"(line {err.lineno})")
        return False
    except Exception as err:  # an edit broke the import: say so in one line
        print(f"  ERROR  workshop/{name}.py cannot be imported: {one_line(err)} "
              f"({where_in_exercise(err)})")
        return False
    passed, todos = 0, set()
    for title, fn in CHECKS[n]:
        try:
            fn(funcs)
        except Todo as todo:
            place = where_in_exercise(todo)
            if place in todos:
                print(f"  TODO   {title}: not run, the TODO at {place} (above) comes first")
            else:
                todos.add(place)
                print(f"  TODO   {title}: not written yet: {place} still says TODO(\"{todo}\")")
        except Wrong as wrong:
            print(f"  WRONG  {title}: {wrong}")
        except Exception as err:  # the exercise's code raised: one line, what and where
            where = where_in_exercise(err)
            print(f"  ERROR  {title}: the code raised {one_line(err)} (at {where})")
        else:
            passed += 1
            print(f"  ok     {title}")
    total = len(CHECKS[n])
    print(f"exercise {n}: all {total} checks passed" if passed == total else
          f"exercise {n}: {passed} of {total} checks passed")
    return passed == total


USAGE = "usage: python workshop/check.py N | --all [--solution], N from 1 to 6"


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    use_solution = "--solution" in args
    rest = [a for a in args if a != "--solution"]
    if rest == ["--all"]:
        numbers = list(EXERCISES)
    elif len(rest) == 1 and rest[0].isdigit() and int(rest[0]) in EXERCISES:
        numbers = [int(rest[0])]
    else:
        print(f"check.py: got {' '.join(args) or 'no argument'}: give an exercise number from 1 "
              f"to 6, or --all ({USAGE})", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # small checks; the other core stays with the background training
    failed = []
    for n in numbers:
        if not run_exercise(n, use_solution):
            failed.append(n)
        print()
    if len(numbers) > 1:
        print("every exercise passed" if not failed else
              f"exercises with checks to fix: {', '.join(map(str, failed))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
