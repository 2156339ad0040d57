"""tests/test_stage2.py: Stage II: the experts, pair validation, alignment, the OpenAI-compatible client against a
local fake server (retries, cache, no key leaks), and a --tiny end-to-end run with resume."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import rediff
import train_stage2
from data import shapes
from data.score import score_caption
from data.tokenizer import WordTokenizer
from experts import (RIGHT, AlignExpert, AnswerCache, ExpertError, Item, OpenAIExpert, OracleExpert,
                     pairs_from_rewrite, parse_review, validate_pairs)
from tests.fake_openai import FakeOpenAI, local_only, prompt_text

SCENE = {"objects": [{"shape": "circle", "colour": "red", "size": "large", "row": 0, "col": 0},
                     {"shape": "square", "colour": "blue", "size": "small", "row": 1, "col": 2},
                     {"shape": "star", "colour": "yellow", "size": "large", "row": 2, "col": 1}]}
RED = "there is a large red circle at the top-left ."
BLUE = "a small blue square is at the right ."
STAR = "the bottom has a large yellow star ."
TRUTH = f"{RED} {BLUE} {STAR}"
TOKENIZER = WordTokenizer.for_shapes_world()


def apply(draft: str, pairs) -> str:
    for pair in pairs:
        assert draft.count(pair["org"]) >= 1
        draft = draft.replace(pair["org"], pair["target"], 1)
    return draft


def oracle(draft, scene=SCENE):
    expert = OracleExpert()
    return expert.review_one(Item(draft, TRUTH, scene)), expert.counts


def changed_words(a: str, b: str) -> list[int]:
    wa, wb = a.split(), b.split()
    assert len(wa) == len(wb), "edits keep the length"
    return [i for i, (x, y) in enumerate(zip(wa, wb)) if x != y]

# ---------------------------------------------------------------------------------------------------- the oracle


def test_oracle_fixes_a_wrong_colour_minimally():
    review, _ = oracle(f"there is a large green circle at the top-left . {BLUE}")
    assert review == [{"org": "green", "target": "red"}]


def test_oracle_fixes_a_repeated_word_into_a_true_sentence():
    draft = f"{BLUE} there is a large red red at the top-left ."
    review, _ = oracle(draft)
    fixed = apply(draft, review)
    assert fixed == f"{BLUE} {RED}"
    assert changed_words(draft, fixed) == [14]  # "red red" -> "red circle": one word


def test_oracle_fixes_a_garbled_sentence_at_equal_length():
    draft = f"{RED} the the the circle circle ."
    review, _ = oracle(draft)
    fixed = apply(draft, review)
    assert fixed.startswith(RED), "the right sentence is untouched"
    s = score_caption(fixed, SCENE)
    assert s["factuality"] == 1 and s["repetition"] == 0 and s["syntax"] == 1


def test_oracle_repairs_lost_and_missing_full_stops():
    assert oracle(f"{RED} a small blue square is at the right purple")[0] == [{"org": "purple", "target": "."}]
    draft = "the bottom has a large yellow star a small blue square is at the right ."  # a "." was lost
    fixed = apply(draft, oracle(draft)[0])
    assert fixed.count(".") == 2 and score_caption(fixed, SCENE)["factuality"] == 1


def test_oracle_says_right_for_correct_captions_in_any_order():
    assert oracle(TRUTH)[0] == RIGHT
    reordered = f"{STAR} {RED}"  # true, but not the ground truth's order (and one object left out)
    assert oracle(reordered)[0] == RIGHT


def test_oracle_never_touches_right_sentences():
    draft = f"{STAR} there is a small blue square at the left . {RED}"
    review, _ = oracle(draft)
    fixed = apply(draft, review)
    n_star = len(STAR.split())
    assert all(n_star <= i < n_star + 10 for i in changed_words(draft, fixed)), "only the false sentence changes"
    assert score_caption(fixed, SCENE)["factuality"] == 1


def test_oracle_rewrites_a_repeated_sentence_into_an_unsaid_claim():
    draft = f"{RED} {RED}"
    review, _ = oracle(draft)
    fixed = apply(draft, review)
    assert fixed.startswith(RED + " ") and fixed.count("red circle") == 1, "the first statement is kept"
    s = score_caption(fixed, SCENE)
    assert s["repetition"] == 0 and s["factuality"] == 1


def test_oracle_leaves_unrepairable_sentences_alone_and_counts_them():
    review, counts = oracle(f"{RED} circle .")
    assert review == [] and counts["unrepairable_sentences"] == 1
    review, counts = oracle("")
    assert review == [] and counts["empty_drafts"] == 1


def test_oracle_pairs_pass_validation_on_real_scenes():
    """Every pair of every oracle review of hallucinated ground truths is kept, and the result is all true."""
    expert, counts, rng = OracleExpert(), Counter(), np.random.default_rng(0)
    for i in range(40):
        s = shapes.sample("train", i)
        pair = shapes.hallucination_pair(s["scene"], s["caption"], rng)
        if pair is None:
            continue
        review = expert.review_one(Item(pair["wrong"], s["caption"], s["scene"]))
        assert review not in (RIGHT, [])
        assert len(validate_pairs(review, TOKENIZER.encode(pair["wrong"]), TOKENIZER, counts)) == len(review)
        assert score_caption(apply(pair["wrong"], review), s["scene"])["factuality"] == 1
    assert counts["pairs_kept"] == counts["pairs_proposed"] > 0


def test_pairs_grow_until_org_is_unique():
    words = "a b a c a b".split()
    fixed = "a b a d a b".split()
    assert pairs_from_rewrite(words, fixed) == [{"org": "c", "target": "d"}]
    fixed = "x b a c a b".split()   # "a" alone is repeated, "a b" too, "a b a" is unique
    assert pairs_from_rewrite(words, fixed) == [{"org": "a b a", "target": "x b a"}]


def test_pair_spans_are_the_smallest_unique_windows():
    words = "k b z b z k".split()
    fixed = "k y z b z k".split()   # "b" and "b z" repeat; "k b" (to the left) is the smallest unique window
    assert pairs_from_rewrite(words, fixed) == [{"org": "k b", "target": "k y"}]
    words = "a red circle . a red square .".split()
    fixed = "a blue circle . a red square .".split()  # "red" repeats: one neighbour is enough
    assert pairs_from_rewrite(words, fixed) == [{"org": "red circle", "target": "blue circle"}]

# ---------------------------------------------------------------------------------------------------- align expert


def test_align_expert_fixes_equal_blocks_and_rewrites_valid_wording():
    expert = AlignExpert()
    assert expert.review_one(Item(TRUTH, TRUTH)) == RIGHT
    assert expert.review_one(Item(TRUTH.replace("blue", "green"), TRUTH)) == \
        [{"org": "green", "target": "blue"}]
    # Its weakness: a true sentence in other words is "corrected" towards the ground truth's wording.
    review = expert.review_one(Item("there are two shapes .", "there are two objects ."))
    assert review == [{"org": "shapes", "target": "objects"}]

# ---------------------------------------------------------------------------------------------------- validation


def test_validate_pairs_rejects_by_reason():
    draft = "there is a large red circle at the top-left . there is a small red square at the left ."
    ids = TOKENIZER.encode(draft) + [TOKENIZER.eos_id] * 3 + TOKENIZER.encode("purple")  # nothing after eos counts
    pairs = [{"org": "large red", "target": "large blue"},        # kept
             {"org": "purple", "target": "green"},                # absent (only after the end of text)
             {"org": "red", "target": "blue"},                    # repeated
             {"org": "small red square", "target": "small blue"},  # length_mismatch
             {"org": "red circle", "target": "blue circle"},      # overlap with the first
             {"org": "top-left", "target": "top-left"},           # unchanged
             {"org": "at the top", "target": "at the rectangle"},  # unknown_word
             {"org": 3, "target": "x"}, "junk", {"org": "", "target": ""}]
    counts = Counter()
    kept = validate_pairs(pairs, ids, TOKENIZER, counts)
    assert kept == [(3, TOKENIZER.encode("large blue"))]
    assert counts["pairs_proposed"] == 10 and counts["pairs_kept"] == 1
    for reason, n in {"absent": 1, "repeated": 1, "length_mismatch": 1, "overlap": 1, "unchanged": 1,
                      "unknown_word": 1, "malformed": 2, "empty": 1}.items():
        assert counts["rejected_" + reason] == n, reason

# ---------------------------------------------------------------------------------------------------- alignment


def test_apply_corrections_hand_example():
    draft = torch.tensor([10, 11, 12, 13, 2, 2])
    refined, mistake = train_stage2.apply_corrections(draft, [(1, [20]), (3, [21, 22])])
    assert refined.tolist() == [10, 20, 12, 21, 22, 2]
    assert mistake.tolist() == [False, True, False, True, True, False]
    assert draft.tolist() == [10, 11, 12, 13, 2, 2], "the draft itself is not modified"


def test_align_builds_targets_and_drops_drafts_without_pairs():
    G = 24
    def row(text):
        ids = TOKENIZER.encode(text)
        return torch.tensor(ids + [TOKENIZER.eos_id] * (G - len(ids)))
    drafts = [{"ids": row(f"there is a large green circle at the top-left . {BLUE}")} for _ in range(4)]
    reviews = [[{"org": "green circle", "target": "red circle"}], RIGHT, None, [{"org": "red", "target": "blue"}]]
    counts = Counter()
    samples = train_stage2.align(drafts, reviews, TOKENIZER, counts)
    assert len(samples) == 1 and counts["right"] == 1 and counts["no_answer"] == 1 and counts["no_valid_pair"] == 1
    sample = samples[0]
    assert sample["mistake"].nonzero().flatten().tolist() == [4, 5]
    assert sample["refined"].tolist() == row(f"{RED} {BLUE}").tolist()
    # Eq. 4 sees only the mistake positions: uniform logits give log V there, whatever the other positions hold.
    logits = torch.zeros(1, G, TOKENIZER.vocab_size)
    loss = rediff.refinement_loss(logits, sample["refined"][None], sample["mistake"][None])
    assert loss.item() == pytest.approx(np.log(TOKENIZER.vocab_size), rel=1e-6)

# ---------------------------------------------------------------------------------------------------- openai expert


def test_parse_review_variants():
    assert parse_review("right") == RIGHT and parse_review(" Right.\n") == RIGHT and parse_review("[]") == RIGHT
    edit = [{"org": "red", "target": "blue"}]
    assert parse_review('```json\n[{"org": "red", "target": "blue"}]\n```') == edit
    assert parse_review('Here are the edits: [{"org": "red", "target": "blue"}] done') == edit
    assert parse_review('{"edits": [{"org": "red", "target": "blue"}]}') == edit
    assert parse_review("the caption is wrong [not json") is None and parse_review("") is None


SECRET = "sk-test-SECRET-0123456789"
EDIT = "there is a small red circle at the top ."


def draft_of(body: dict) -> str:
    return prompt_text(body).rsplit("Draft: ", 1)[1]


def expert_answer(draft: str, n: int):
    if draft == EDIT:
        return 200, '```json\n[{"org": "red", "target": "blue"}]\n```'
    if draft.startswith("garbled"):
        return 200, "the caption is wrong [not json"
    if draft.startswith("busy") and n == 1:
        return 429, None
    if draft.startswith("broken"):
        return 503, None
    return 200, "right"


def images_sent(fake) -> list[str]:
    return [c["image_url"]["url"][:22] for body in fake.bodies for c in body["messages"][0]["content"]
            if c["type"] == "image_url"]


@pytest.fixture
def fake_chat(monkeypatch):
    local_only(monkeypatch, SECRET)
    with FakeOpenAI(draft_of, expert_answer, delay=0.02) as fake:
        yield fake


def test_openai_expert_retries_counts_and_caches(fake_chat, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache.jsonl"
    image = Image.new("RGB", (48, 48), (200, 30, 30))
    items = [Item(d, TRUTH, image=image) for d in ["alpha .", EDIT, "garbled .", "busy .", "beta .", "broken ."]]
    make = lambda: OpenAIExpert("fake-model", fake_chat.url, str(cache), max_in_flight=2, max_retries=2,  # noqa: E731
                                backoff=0.01, timeout=10)
    expert = make()
    reviews = expert.review(items)
    assert reviews == [RIGHT, [{"org": "red", "target": "blue"}], None, RIGHT, RIGHT, None]
    c = expert.counts
    assert (c["malformed"], c["failed"], c["retries"], c["requests"], c["cache_hits"]) == (1, 1, 3, 9, 0)
    assert fake_chat.max_in_flight <= 2
    assert fake_chat.auth == {f"Bearer {SECRET}"}
    assert images_sent(fake_chat) == ["data:image/png;base64,"] * 9
    kept = validate_pairs(reviews[1], TOKENIZER.encode(EDIT), TOKENIZER, Counter())
    assert kept == [(4, TOKENIZER.encode("blue"))]
    text = cache.read_text()
    assert len(text.splitlines()) == 5, "every answer is cached (the malformed one too), failures are not"
    assert SECRET not in text and SECRET not in capsys.readouterr().out

    # A second run is served from the cache: no request, not even a key needed.
    monkeypatch.delenv("OPENAI_API_KEY")
    paid = sum(fake_chat.requests.values())
    again = make()
    assert again.review(items[:5]) == reviews[:5]
    assert sum(fake_chat.requests.values()) == paid and again.counts["cache_hits"] == 5
    assert again.counts["requests"] == 0 and again.counts["malformed"] == 1
    # An item that was never answered needs the endpoint again, hence the key: a clear error without one.
    with pytest.raises(ExpertError, match="OPENAI_API_KEY"):
        again.review(items[5:])


def test_openai_expert_refused_key_stops_with_a_clear_message(monkeypatch):
    local_only(monkeypatch, SECRET)
    refuse = lambda item, n: (401, "Incorrect API key provided: sk-tes***789")  # noqa: E731
    with FakeOpenAI(draft_of, refuse) as fake:
        expert = OpenAIExpert("m", fake.url, None, backoff=0.01)
        with pytest.raises(ExpertError, match="401") as err:
            expert.review([Item("alpha .", TRUTH)])
        assert SECRET not in str(err.value)
        assert sum(fake.requests.values()) == 1, "a refused key is not retried"


def test_openai_expert_skips_and_counts_an_unreachable_endpoint(monkeypatch):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    expert = OpenAIExpert("m", f"http://127.0.0.1:{port}/v1", None, max_retries=1, backoff=0.01, timeout=5)
    assert expert.review([Item("alpha .", TRUTH)]) == [None]
    assert (expert.counts["requests"], expert.counts["retries"], expert.counts["failed"]) == (2, 1, 1)


def test_cache_ignores_a_torn_last_line_and_keeps_appending(tmp_path):
    path = tmp_path / "cache.jsonl"
    good = [json.dumps({"key": f"k{i}", "answer": "right"}) for i in range(2)]
    path.write_bytes(("\n".join(good) + "\n").encode() + b"\xff\xfe not utf-8\n" + b'{"key": "k2", "answ')
    cache = AnswerCache(str(path))
    assert set(cache.answers) == {"k0", "k1"} and cache.bad_lines == 2
    cache.put("k3", '[{"org": "a", "target": "b"}]', model="m")
    reloaded = AnswerCache(str(path))
    assert set(reloaded.answers) == {"k0", "k1", "k3"} and reloaded.bad_lines == 2

# ---------------------------------------------------------------------------------------------------- end to end


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_stage2.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for flag in ("--init-from", "--rounds", "--drafts-per-round", "--tokens-per-step", "--expert-model",
                 "--expert-base-url", "--max-in-flight", "--cache", "--stage1-mix", "--tiny", "--resume"):
        assert flag in out


def test_init_from_is_checked(tmp_path, capsys):
    from checkpoints import save_checkpoint
    with pytest.raises(SystemExit, match="--init-from is required"):
        train_stage2.main(["--out", str(tmp_path / "s2.safetensors")])
    with pytest.raises(SystemExit, match="does not exist"):
        train_stage2.main(["--init-from", str(tmp_path / "missing.safetensors")])
    from tests.test_model import tiny_vlm
    odd = tmp_path / "odd.safetensors"
    save_checkpoint(str(odd), tiny_vlm(), {"stage": "llada-v", "tokenizer": TOKENIZER.to_dict()})
    with pytest.raises(SystemExit, match="kind 'llada-v'"):
        train_stage2.main(["--init-from", str(odd), "--out", str(tmp_path / "s2.safetensors")])


def drafts_with_mistakes(real_drafts):
    """make_drafts that drafts for real, then (a model trained for a few steps writes nothing) puts hallucinated
    ground truths in the drafts' place, so the expert has mistakes to fix."""
    from data.pipeline import answer_ids

    def make_drafts(model, source, cfg, round_index, ctx):
        drafts = real_drafts(model, source, cfg, round_index, ctx)
        rng = np.random.default_rng(0)
        for d in drafts:
            pair = shapes.hallucination_pair(d["scene"], d["truth"], rng)
            d["text"] = pair["wrong"] if pair else d["truth"]
            d["ids"] = torch.tensor(answer_ids(source.tokenizer, d["text"], source.answer_len))
        return drafts
    return make_drafts


def test_tiny_stage2_end_to_end_with_resume(tmp_path, one_thread, fake_chat, monkeypatch, capsys):
    import train_stage1
    from checkpoints import read_checkpoint
    s1, s2 = str(tmp_path / "stage1.safetensors"), str(tmp_path / "stage2.safetensors")
    train_stage1.main(["--tiny", "--steps", "4", "--eval-every", "4", "--n-scenes", "64",
                       "--vision-pretrain-steps", "2", "--batch-size", "8", "--out", s1])
    monkeypatch.setattr(train_stage2, "make_drafts", drafts_with_mistakes(train_stage2.make_drafts))
    common = ["--out", s2, "--drafts-per-round", "6", "--tokens-per-step", "4", "8", "--steps", "2",
              "--batch-size", "4", "--n-scenes", "16", "--draft-batch", "4"]
    train_stage2.main(["--init-from", s1] + common)
    out = capsys.readouterr().out
    assert "drafts made 6 (4 tok/step: 3 drafts" in out and "expert oracle" in out and "rejected 0" in out
    assert "training samples" in out and "expert fixes" in out
    _, meta = read_checkpoint(s2)
    assert (meta["stage"], meta["round"], meta["step"]) == ("stage2", 1, 2)
    assert meta["expert_stats"]["pairs_kept"] > 0 and meta["train_config"]["expert"] == "oracle"
    assert meta["stage1_config"]["objective"] == "revision" and meta["answer_len"] == 48
    assert meta["init_stage"] == "stage1-revision", "a Stage II checkpoint records what it started from"
    assert meta["history"][0]["refine_loss"] > 0

    # Resume for a second round, with the openai expert on the local fake server; the key goes nowhere.
    cache = tmp_path / "expert.jsonl"
    openai_flags = ["--expert", "openai", "--expert-base-url", fake_chat.url, "--cache", str(cache), "--rounds", "2"]
    train_stage2.main(common + openai_flags + ["--resume"])
    out = capsys.readouterr().out
    _, meta = read_checkpoint(s2)
    assert meta["round"] == 2 and len(meta["history"]) == 2 and "round 2/2" in out and "round 1/2" not in out
    assert meta["init_stage"] == "stage1-revision", "kept across --resume"
    paid = sum(fake_chat.requests.values())
    assert paid == 6 and meta["history"][1]["expert"]["requests"] == 6
    for where in (out, cache.read_text(), open(s2, "rb").read().decode("latin-1")):
        assert SECRET not in where
    train_stage2.main(common + openai_flags + ["--resume"])
    assert "nothing to do" in capsys.readouterr().out and sum(fake_chat.requests.values()) == paid
