"""tests/test_llada_v_stage2.py: train_stage2.py --init-from FOLDER (Stage II on LLaDA-V) on the
tiny real-format folder of tests/test_llada_v.py, the caption set of tests/test_llada_v_stage1.py
and a fake OpenAI endpoint: a known expert edit gives the hand-computed kept pair, mistake mask and
Eq. 4 loss; batched drafts are llada_v.caption's; a 2-round run trains and exports a folder that
loads back; the same run stopped after round 1 in 2 processes (FSDP2, gloo: drafts from the gathered
drafting replica) and resumed in 1 ends the same, with every expert answer from the cache."""
import base64
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import distributed
import llada_v_train as lt
import train_stage2
from cli import parse_config
from data.captions import CaptionData
from experts import OpenAIExpert, occurrences, validate_pairs
from llada_v import (CAPTION_QUESTION, EOS_ID, EOT_ID, STATE_FILE, anyres_images, caption, load_llada_v,
                     prompt_ids)
from tests.fake_openai import FakeOpenAI, local_only, prompt_text
from tests.test_llada_v_stage1 import dataset  # noqa: F401  (module-scoped fixture: 8 captioned images)
from tests.test_llada_v import tiny  # noqa: F401  (module-scoped fixture: the tiny checkpoint folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "sk-test-SECRET-llada-v-stage2"
N_BPE = 300  # the tiny tokenizer's real (byte-level BPE) tokens; ids above are reserved up to the real vocab size


def draft_of(body) -> str:
    """The fake server's item key: the draft, the last line of the request's prompt."""
    return prompt_text(body).split("\nDraft: ")[-1]


@pytest.fixture(scope="module")
def wordy(tiny, tmp_path_factory):
    """The tiny folder with the LM head's rows set to zero but those of the 44 merged BPE tokens (" the", "at",
    "header", ...): the zeroed logits are 0 and the largest of the 44 others is positive, so drafts are made of
    merged tokens (text an expert can quote), never of single bytes or reserved ids."""
    folder = tmp_path_factory.mktemp("wordy")
    for name in os.listdir(tiny[0]):
        tensors = load_file(os.path.join(tiny[0], name)) if name.endswith(".safetensors") else {}
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"][N_BPE:] = tensors["lm_head.weight"][:256] = 0
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
        else:
            shutil.copy(os.path.join(tiny[0], name), folder)
    with open(folder / STATE_FILE, "w") as f:  # as the export of a Stage I run of --answer-len 12
        json.dump({"train_config": {"objective": "revision", "answer_len": 12}}, f)
    return str(folder)

# ----------------------------------------------------------------------------------------------------------------


def test_known_edit_gives_the_kept_pair_mistake_mask_and_eq4_loss(tiny, dataset, monkeypatch):
    model, tokenizer = load_llada_v(tiny[0])
    text = "a cat sits on a red mat."
    answer = tokenizer.encode(text)
    draft_ids = torch.tensor(answer + [EOT_ID] * 3)                                        # (G,)
    paths = [os.path.join(os.path.dirname(dataset[0]), "images", f"{i}.png") for i in (0, 1)]
    prompts = [prompt_ids(tokenizer, model.n_image_tokens(Image.open(p).size), CAPTION_QUESTION) for p in paths]
    assert len(prompts[0]) != len(prompts[1]), "two prompt lengths: the batch is right-padded"
    drafts = [{"image_path": p, "truth": "a red picture.", "prompt": q, "tokens_per_step": 4, "ids": draft_ids,
               "text": text, "scene": None, "image": None} for p, q in zip(paths, prompts)]
    edits = [{"org": "cat", "target": "at"},           # kept: spelt " cat" in the draft (" c", "at") -> " at"
             {"org": "red mat", "target": "cat mat"},   # kept: this tokenizer spells "red mat" alike after a space
             {"org": "a", "target": "the"},             # "a" occurs 4 times in the text: repeated
             {"org": "sits on", "target": "x"},         # 5 tokens -> 1: length mismatch
             {"org": "dog", "target": "cat"},           # not in the draft: absent
             {"org": 3, "target": "x"}]                 # malformed
    local_only(monkeypatch, SECRET)
    with FakeOpenAI(draft_of, lambda item, n: (200, json.dumps(edits))) as fake:
        expert = OpenAIExpert(base_url=fake.url)
        for draft in drafts:
            draft["image"] = lt.expert_image(draft["image_path"])
        reviews, counts = train_stage2.review_drafts(expert, drafts, distributed.Context())
    assert fake.requests == Counter({text: 2}), "one request per draft (two images)"
    sent = {body["messages"][0]["content"][1]["image_url"]["url"] for body in fake.bodies}
    assert sent == {"data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode() for path in paths}
    assert validate_pairs(reviews[0][:1], answer, tokenizer, Counter()) == [], "without in_context: not found"
    reviews = [lt.in_context(rv, d, tokenizer, counts) for rv, d in zip(reviews, drafts)]
    samples = train_stage2.align(drafts, reviews, tokenizer, counts)
    assert {k: v for k, v in counts.items() if k.startswith(("pairs_", "rejected_"))} == {
        "pairs_proposed": 12, "pairs_kept": 4, "rejected_repeated": 2, "rejected_length_mismatch": 2,
        "rejected_absent": 2, "rejected_malformed": 2}

    mistake, refined = torch.zeros(len(draft_ids), dtype=torch.bool), draft_ids.clone()
    for org, target in ((" cat", " at"), ("red mat", "cat mat")):  # located by hand in the draft's ids
        org, target = tokenizer.encode(org), tokenizer.encode(target)
        start = occurrences(answer, org)[0]
        assert len(org) == len(target) and occurrences(answer, org) == [start]
        mistake[start:start + len(org)] = True
        refined[start:start + len(org)] = torch.tensor(target)
    assert mistake.sum() == 2 + 5
    for sample in samples:
        assert torch.equal(sample["mistake"], mistake) and torch.equal(sample["refined"], refined)
        assert sample["pairs"][:2] == [{"org": " cat", "target": " at"}, edits[1]]

    data = CaptionData([], [], model, tokenizer, 20, 0)
    batch = lt.eq4_batch(samples, [0, 1])
    rows = data.rows(batch.samples, [s["prompt"] for s in batch.samples], batch.drafts)
    with torch.no_grad():
        loss = lt.eq4_loss(model, data, batch, slice(None), "cpu")
    terms = []  # by hand: each row alone; -log p(corrected token) at each row's 7 mistake positions
    L = max(len(q) for q in prompts) + len(draft_ids)
    for sample, b in zip(samples, range(2)):
        P, G = len(sample["prompt"]), len(draft_ids)
        row = torch.tensor(sample["prompt"] + draft_ids.tolist() + [EOS_ID] * (L - P - G))  # visible padding, as LLaDA
        assert torch.equal(rows.ids[b], row) and (rows.start + rows.answer_at[b]).tolist() == list(range(P, P + G))
        assert torch.equal(batch.refined[b], refined) and torch.equal(batch.mistake[b], mistake)
        assert batch.mistake[b].sum() == 7
        images = anyres_images(model, [sample["image_path"]])
        with torch.no_grad():
            logits = model(row[None], images=images)[0]                                      # (L, V)
        for j in mistake.nonzero()[:, 0].tolist():
            terms.append(-F.log_softmax(logits[P + j], dim=-1)[refined[j]])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-4)


def test_batched_drafts_are_llada_v_caption_image_by_image(tiny, dataset, tmp_path):
    argv = ["--init-from", tiny[0], "--data-json", dataset[0], "--gen-length", "8", "--tokens-per-step", "1",
            "4", "--draft-batch", "2", "--drafts-per-round", "4", "--device", "cpu", "--out", str(tmp_path / "o")]
    cfg = parse_config(train_stage2.Stage2Config, argv)
    assert lt.choose(cfg, argv, lt.STAGE2_DEFAULTS)
    run = lt.Stage2Run(cfg, distributed.Context())
    model, tokenizer = run.model, run.tokenizer
    records = [run.captions[i] for i in (0, 1, 4, 7)]  # speeds 1, 4, 1, 4
    run.draft_items = lambda r, n: [dict(c, prompt_ids=run.data.prompt(c), group=len(run.data.prompt(c)))
                                    for c in records]
    drafts = train_stage2.make_drafts(model, run, cfg, 0, distributed.Context())
    lengths = [len(d["prompt"]) for d in drafts]  # 40 x 30 and 50 x 50 share a layout, so do 30 x 60 and 45 x 60:
    assert lengths[0] == lengths[2] != lengths[1] == lengths[3]  # each pair is drafted in one batch
    for draft, record in zip(drafts, records):
        alone = caption("", record["image_path"], draft["tokens_per_step"], True, 8, record["prompt"],
                        loaded=(model, tokenizer))
        assert draft["ids"].tolist() == alone["ids"].tolist() and draft["text"] == alone["text"]


# ----------------------------------------------------------------------------------------------------------------
# Real runs


def replacement(tokenizer, word: str) -> str:
    """Another word with the same token count after a space."""
    n = len(tokenizer.encode(" " + word))
    return next(c for c in ["the", "a", "on", "red", "cat", "mat"] + ["q" * j for j in range(1, 40)]
                if c != word and len(tokenizer.encode(" " + c)) == n)


def edit_answer(tokenizer):
    """The fake expert: for each draft, replacements of its first 3 words that occur once, and of its first 3
    merged tokens of the tokenizer ("at", "header", ...) whose text occurs once; "right" when there is none. Some are
    rejected (a word that the draft's ids spell otherwise than the tokenizer, overlaps), some kept."""
    merged = sorted(t for t in (tokenizer.decode([i]) for i in range(256, N_BPE)) if t.isalpha() and len(t) > 1)

    def answer(draft: str, n: int):
        words = [w for w in draft.split() if draft.count(w) == 1][:3]
        pieces = [t for t in merged if draft.count(t) == 1][:3]
        pairs = [{"org": w, "target": replacement(tokenizer, w)} for w in words]
        pairs += [{"org": t, "target": "on" if t != "on" else "at"} for t in pieces]
        return 200, json.dumps(pairs) if pairs else "right"
    return answer


def args(folder, data_json, url, out, cache, *extra):
    return ["--init-from", folder, "--data-json", data_json, "--rounds", "2", "--drafts-per-round", "4",
            "--gen-length", "12", "--tokens-per-step", "1", "4", "8", "--draft-batch", "2", "--expert-base-url", url,
            "--cache", cache, "--batch-size", "4", "--stage1-mix", "0.5", "--steps", "2",
            "--lr", "1e-3", "--warmup", "1", "--save-dtype", "float32", "--shard-gb", "0.01",
            "--device", "cpu", "--out", out, *extra]


@pytest.fixture(scope="module")
def runs(wordy, dataset, tmp_path_factory):
    """single: 2 rounds in this process, 2 micro-batches a step. resumed: round 1 in 2 processes of
    one micro-batch (torchrun, FSDP2 on gloo: drafts from the drafting replica) with --stop-at 1, then
    round 2 in this process with --resume; both on single's --cache, so every answer must come from
    it."""
    d = tmp_path_factory.mktemp("stage2")
    p = lambda name: str(d / name)  # noqa: E731
    _, tokenizer = load_llada_v(wordy)
    info = {}
    with FakeOpenAI(draft_of, edit_answer(tokenizer)) as fake, pytest.MonkeyPatch.context() as mp:
        local_only(mp, SECRET)
        info["single"] = train_stage2.main(args(wordy, dataset[0], fake.url, p("single"), p("cache.jsonl"), "--grad-accum",
                                      "2"))
        info["requests"] = sum(fake.requests.values())
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "tests/torchrun_runs.py", "train_stage2.py",
                              *args(wordy, dataset[0], fake.url, p("resumed"), p("cache.jsonl"), "--parallel", "fsdp",
                                    "--stop-at", "1")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
        info["stdout"], info["stopped"] = out.stdout, distributed.read_dcp_meta(p("resumed.dcp"))
        train_stage2.main(args(wordy, dataset[0], fake.url, p("resumed"), p("cache.jsonl"), "--resume", "--grad-accum", "2"))
        info["requests_after"] = sum(fake.requests.values())
        info["files"] = sorted(os.listdir(d))
    return p, info


def history(folder):
    with open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)["history"]


def assert_same_history(a, b):
    assert [h["round"] for h in a] == [h["round"] for h in b] == [1, 2]
    for ha, hb in zip(a, b):
        assert (ha["samples"], ha["mistake_tokens"], ha["expert"]["pairs_kept"]) == \
               (hb["samples"], hb["mistake_tokens"], hb["expert"]["pairs_kept"])
        assert len(ha["losses"]) == len(hb["losses"])
        for la, lb in zip(ha["losses"], hb["losses"]):
            assert la == pytest.approx(lb, rel=1e-5), (la, lb)


def test_two_rounds_train_on_kept_pairs_and_export_a_folder_that_loads_back(runs, wordy):
    p, info = runs
    rounds = history(p("single"))
    assert [(h["round"], h["drafts"], h["step"]) for h in rounds] == [(1, 4, 2), (2, 4, 4)]
    for h in rounds:
        e = h["expert"]
        assert h["samples"] > 0 and h["mistake_tokens"] > 0 and e["pairs_kept"] > 0, "something was fine-tuned"
        rejected = sum(v for k, v in e.items() if k.startswith("rejected_"))
        assert e["pairs_proposed"] == e["pairs_kept"] + rejected and e["requests"] == 4
        assert all(set(s) == {"step", "refine", "stage1", "total"} and s["refine"] > 0 for s in h["losses"])
    assert info["requests"] == 8, "each draft asked once"
    with open(os.path.join(p("single"), STATE_FILE)) as f:  # the mix rows: the Stage I export's
        assert json.load(f)["stage1_config"]["answer_len"] == 12
    trained, _ = load_llada_v(p("single"))
    source, _ = load_llada_v(wordy)
    before, after = dict(source.named_parameters()), dict(trained.named_parameters())
    changed = {name for name, w in after.items() if not torch.equal(w, before[name])}
    assert changed == set(after), "everything trains (the tower at --vision-lr)"
    in_memory = dict(info["single"].named_parameters())
    for name, w in after.items():
        torch.testing.assert_close(w, in_memory[name].detach())


def test_two_processes_then_one_resumed_end_as_the_single_run_from_the_expert_cache(runs):
    p, info = runs
    stopped = info["stopped"]
    assert (stopped["round"], stopped["step"], stopped["written_by_processes"]) == (1, 2, 2)
    assert info["stdout"].count("round 1/2 | drafts 4") == 1, "rank 0 prints, rank 1 does not"
    assert info["requests_after"] == info["requests"], "no request: every answer from --cache, on both ranks too"
    assert not [f for f in info["files"] if ".rank" in f], "no per-rank cache file left"
    assert all(h["expert"]["cache_hits"] == 4 and "requests" not in h["expert"] for h in history(p("resumed")))
    assert_same_history(history(p("single")), history(p("resumed")))  # round 1 from the 2 processes
    for shard in sorted(f for f in os.listdir(p("single")) if f.endswith(".safetensors")):
        a, b = load_file(os.path.join(p("single"), shard)), load_file(os.path.join(p("resumed"), shard))
        for key, weight in a.items():
            torch.testing.assert_close(b[key], weight, rtol=1e-4, atol=1e-5)


def test_clear_errors(tiny, dataset, tmp_path):
    base = ["--init-from", tiny[0], "--data-json", dataset[0], "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as err:
        train_stage2.main(base + ["--stage1-mix", "1"])
    assert err.value.code == 2  # argparse: must be less than 1
    with pytest.raises(SystemExit, match="--vicrit-jsonl / --vicrit-train-json feed"):
        train_stage2.main(base + ["--vicrit-jsonl", dataset[1], "--stage1-mix", "0"])
    with pytest.raises(SystemExit, match="--data-json is required"):
        train_stage2.main(["--init-from", tiny[0]])


def test_recorded_drafts_train_with_eq4_without_drafting_or_an_expert(tiny, dataset, tmp_path, capsys):
    """--drafts-json: ReDiff's Stage II records (the model's draft as the answer, the expert's
    corrections in "revise") are Eq. 4 samples as they are: no drafting and no expert request; the
    corrected tokens are the mistake mask, the weights move, the export loads back."""
    data_json = dataset[0]
    records = json.load(open(data_json))
    drafts = [dict(records[i], conversations=[records[i]["conversations"][0],
                                              {"from": "gpt", "value": "a xkq picture."}],
                   revise=[{"org": "xkq", "target": "qkx"}]) for i in range(4)]
    drafts.append(records[5])  # no corrections: nothing for Eq. 4, left out
    path = tmp_path / "drafts.json"
    json.dump(drafts, open(path, "w"))
    out = str(tmp_path / "o")
    model = train_stage2.main(["--init-from", tiny[0], "--data-json", data_json, "--drafts-json", str(path),
                               "--image-root", os.path.dirname(data_json),
                               "--drafts-per-round", "4", "--gen-length", "20", "--batch-size", "2",
                               "--stage1-mix", "0", "--steps", "2", "--lr", "1e-2", "--warmup", "1",
                               "--save-dtype", "float32", "--shard-gb", "0.01", "--device", "cpu", "--out", out])
    printed = capsys.readouterr().out
    assert "4 recorded drafts with corrections (1 without" in printed
    rounds = [line for line in printed.splitlines() if line.startswith(("round", "  "))]
    assert "expert records: right 0" in printed and "a xkq picture." in printed, rounds
    (h,) = history(out)
    e = h["expert"]
    assert (h["drafts"], h["samples"], e["pairs_kept"], e["recorded"]) == (4, 4, 4, 4)
    assert h["mistake_tokens"] == e["corrected_tokens"] > 0 and "requests" not in e
    assert [set(s) for s in h["losses"]] == [{"step", "refine", "total"}] * 2
    source, _ = load_llada_v(tiny[0])
    moved = (model.lm.lm_head.weight - source.lm.lm_head.weight).abs().max().item()
    assert moved > 1e-3, "lr 1e-2 for 2 steps of Eq. 4 moves the weights"
    loaded, _ = load_llada_v(out)
    torch.testing.assert_close(loaded.lm.lm_head.weight, model.lm.lm_head.weight.detach())
