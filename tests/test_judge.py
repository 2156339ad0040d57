"""tests/test_judge.py: tools/judge.py: CLAIR answers parsed, retried and cached against a local
fake endpoint, the key never written, reference-free statistics on hand-computed examples, and
clear errors for bad input."""
import json

import pytest

from tools import judge
from data.loaders import DataError
from tests.fake_openai import FakeOpenAI, local_only, prompt_text

SECRET = "sk-test-SECRET-judge-0123456789"


ANSWERS = {  # CLAIR answers by candidate caption
    "a red bus on a street": '{"score": 90, "reason": "same bus"}',
    "a bus": '```json\n{"score": 60, "reason": "vague"}\n```',
    "a cat on a sofa": "I think they differ. {\"score\": \"10\", \"reason\": \"a cat\"} hope that helps",
    "garbled": "the score is high",        # no JSON: malformed
    "too big": '{"score": 250}',           # out of range: malformed
}


def candidate_of(body: dict) -> str:
    return prompt_text(body).split("Candidate set:\n- ", 1)[1].split("\nReference set:", 1)[0]


def judge_answer(candidate: str, n: int):
    if candidate == "busy" and n == 1:
        return 429, "slow down"
    return 200, ANSWERS.get(candidate, '{"score": 50, "reason": "busy"}')


@pytest.fixture
def fake_judge(monkeypatch):
    local_only(monkeypatch, SECRET)
    with FakeOpenAI(candidate_of, judge_answer) as fake:
        yield fake


def write_inputs(tmp_path, candidates):
    """A captions JSONL (ids 0..n-1, as int and str) and a LLaVA JSON with one reference per id (two for id 0)."""
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": i if i % 2 else str(i), "caption": c}) + "\n"
                                for i, c in enumerate(candidates)))
    turns = lambda ref: [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": ref}]  # noqa
    records = [{"id": str(i), "image": f"{i}.jpg", "conversations": turns(f"reference {i}")}
               for i in range(len(candidates))]
    records.append({"id": "0", "image": "0.jpg", "conversations": turns("a red double-decker bus")})
    references = tmp_path / "llava.json"
    references.write_text(json.dumps(records))
    return captions, references


def test_parse_score_variants():
    assert judge.parse_score('{"score": 73, "reason": "close"}') == {"score": 73.0, "reason": "close"}
    assert judge.parse_score('```json\n{"score": 12.5, "reason": "no"}\n```') == {"score": 12.5, "reason": "no"}
    assert judge.parse_score('Answer: {"score": "40"} ok') == {"score": 40.0, "reason": ""}
    for bad in ["", "high", '{"reason": "x"}', '{"score": 101}', '{"score": -1}', '{"score": true}',
                '{"score": "NaN"}', '[{"score": 5}]', '{"score": 5']:
        assert judge.parse_score(bad) is None, bad


def test_clair_judged_retried_cached_and_key_never_written(fake_judge, tmp_path, monkeypatch, capsys):
    candidates = ["a red bus on a street", "a bus", "a cat on a sofa", "garbled", "busy", "too big"]
    captions, references = write_inputs(tmp_path, candidates)
    cache, out = tmp_path / "cache.jsonl", tmp_path / "out" / "result.json"
    argv = ["--captions", str(captions), "--references", str(references), "--model", "fake-model",
            "--base-url", fake_judge.url, "--cache", str(cache), "--max-in-flight", "2", "--backoff", "0.01",
            "--json", str(out)]
    result = judge.main(argv)
    j = result["judge"]
    assert [r["score"] for r in result["per_caption"]] == [90.0, 60.0, 10.0, None, 50.0, None]
    assert j["clair"] == pytest.approx((90 + 60 + 10 + 50) / 4)
    assert (j["n_judged"], j["n_skipped"], j["malformed"], j["failed"]) == (4, 2, 2, 0)
    assert (j["requests"], j["retries"], j["cache_hits"]) == (7, 1, 0), "six captions, one 429 retried"
    assert fake_judge.requests["busy"] == 2
    assert fake_judge.auth == {f"Bearer {SECRET}"}
    # Both references of id 0 reach the judge, in CLAIR's prompt.
    first = next(p for p in map(prompt_text, fake_judge.bodies) if "- a red bus on a street\n" in p)
    assert "Reference set:\n- reference 0\n- a red double-decker bus\nOn a precise scale from 0 to 100" in first
    assert "CLAIR (fake-model): 52.500 over 4 judged" in capsys.readouterr().out

    # A second run is served from the cache: zero requests, no key needed, the same numbers.
    monkeypatch.delenv("OPENAI_API_KEY")
    paid = sum(fake_judge.requests.values())
    again = judge.main(argv)
    assert sum(fake_judge.requests.values()) == paid
    assert (again["judge"]["requests"], again["judge"]["cache_hits"]) == (0, 6)
    assert again["per_caption"] == result["per_caption"] and again["judge"]["clair"] == j["clair"]
    for text in (cache.read_text(), out.read_text(), capsys.readouterr().out):
        assert SECRET not in text
    assert len(cache.read_text().splitlines()) == 6, "every answer is cached, the malformed ones too"
    assert json.loads(out.read_text())["judge"]["clair"] == j["clair"]


def test_statistics_hand_computed():
    s = judge.statistics(["The cat sat. The cat sat.", "a dog", ""])
    # words 6, 2, 0 -> 8/3. distinct-1: {the, cat, sat}/6 = 0.5, {a, dog}/2 = 1 -> 0.75 ("" has no words).
    # distinct-2: 3 distinct of 5 bigrams (the cat, cat sat, sat the) = 0.6, 1/1 = 1 -> 0.8.
    # repeated sentences: 1 of 2 = 0.5, 0 of 1 -> 0.25.
    assert s["words"] == pytest.approx(8 / 3) and s["n_captions"] == 3
    assert s["distinct_1"] == pytest.approx(0.75) and s["distinct_2"] == pytest.approx(0.8)
    assert s["repeated_sentences"] == pytest.approx(0.25)
    assert judge.words_of("A red-hat, isn't it?") == ["a", "red", "hat", "isn't", "it"]
    assert judge.repeated_sentences("Hi! hi. HI? there.") == pytest.approx(2 / 4)
    assert judge.statistics([])["words"] is None


def test_no_judge_needs_no_references_nor_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions = tmp_path / "c.jsonl"
    captions.write_text('{"id": "a", "caption": "a dog. a dog."}\n')
    result = judge.main(["--captions", str(captions), "--no-judge", "--cache", ""])
    assert "judge" not in result and result["statistics"]["repeated_sentences"] == 0.5
    assert "1 captions: words 4.000" in capsys.readouterr().out


def test_missing_id_and_bad_lines_give_clear_errors(tmp_path, capsys):
    captions, references = write_inputs(tmp_path, ["a bus", "a cat"])
    with open(captions, "a") as f:
        f.write('{"id": "nope", "caption": "a dog"}\n')
    with pytest.raises(SystemExit) as err:
        judge.main(["--captions", str(captions), "--references", str(references), "--cache", ""])
    assert "line 3" in str(err.value) and "'nope'" in str(err.value) and str(references) in str(err.value)

    for text, message in [('{"id": "a", "caption": "x"}\n{"id": "b", "capt', "line 2 is not valid JSON"),
                          ('{"id": "a", "caption": "x"}\n\n', "line 2 is blank"),
                          ('{"caption": "x"}\n', "line 1: field 'id'"),
                          ('{"id": 3, "caption": null}\n', "line 1: field 'caption'"),
                          ('{"id": 3, "caption": "x"}\n{"id": "3", "caption": "y"}\n', "already appeared on line 1")]:
        captions.write_text(text)
        with pytest.raises(DataError, match=message) as err:
            judge.load_captions(captions)
        assert str(captions) in str(err.value)

    references.write_text(json.dumps([{"id": "0", "conversations": [{"from": "human", "value": "hi"}]}]))
    with pytest.raises(DataError, match="record 0: field 'conversations'"):
        judge.load_references(references)
