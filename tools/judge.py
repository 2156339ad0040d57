"""tools/judge.py: score captions of real images against LLaVA-format references: a CLAIR
LLM-judge score and free statistics.

    python tools/judge.py --captions captions.jsonl --references llava.json [--model o4-mini]
                          [--base-url URL] [--cache judge_cache.jsonl] [--max-in-flight 8]
                          [--json out.json] [--no-judge]

captions.jsonl holds one {"id": ..., "caption": ...} per line; each id must be the "id" of a
record in the LLaVA / ShareGPT4V JSON, whose first assistant ("gpt") turn is a reference caption
(several records with one id give several references). No images: CLAIR compares texts.

CLAIR (Chan et al. 2023, "CLAIR: Evaluating Image Captions with Large Language Models"; CapMAS
reports it): an LLM reads the candidate and the references and answers, as JSON {"score": 0-100,
"reason": ...}, how likely they describe the same image. Requests go through experts.OpenAIExpert:
its OpenAI-compatible client, retries with backoff (429 / 5xx / timeouts / lost connections), at
most --max-in-flight at once, the key from OPENAI_API_KEY only (never printed or saved), its
append-only answer cache (a rerun pays nothing). An answer without a usable score (malformed) or
whose retries ran out (failed) is counted and skipped, never fatal. CLAIR: the judged ones' mean.

Reference-free statistics, no API (per caption, then the mean over captions):
    words          runs of letters, digits and apostrophes, lowercased ("A red-hat." -> a, red, hat)
    distinct_1/2   distinct n-grams / n-grams of the caption's words (1 = no word / word pair
                   repeated); captions of fewer than n words are left out of that mean
    repeated_sentences
                   sentences (split at . ! ?, compared as word lists) equal to an earlier one of
                   the caption / sentences; captions without a word are left out
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)

from cli import check_writable, option, parse_config, run_main  # noqa: E402
from data.loaders import DataError, _decode_utf8, _first_turns, _json_list  # noqa: E402
from experts import ExpertError, Item, OpenAIExpert, check_endpoint  # noqa: E402

# The prompt of CLAIR (Chan et al. 2023), for one candidate caption and a set of references.
CLAIR_PROMPT = """You are trying to tell if a candidate set of captions is describing the same \
image as a reference set of captions.
Candidate set:
{candidates}
Reference set:
{references}
On a precise scale from 0 to 100, how likely is it that the candidate set is describing the same \
image as the reference set? (JSON format, with a key "score", value between 0 and 100, and a key \
"reason" with a string value.)"""


def parse_score(text: str) -> dict | None:
    """A judge's answer -> {"score": float in [0, 100], "reason": str}, or None (malformed). Takes
    code fences and text around the JSON object; the score: an int, a float or a numeric string."""
    text = (text or "").strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    text = fenced.group(1).strip() if fenced else text
    try:
        answer = json.loads(text)
    except ValueError:
        start, end = text.find("{"), text.rfind("}")
        try:
            answer = json.loads(text[start:end + 1]) if 0 <= start < end else None
        except ValueError:
            return None
    if not isinstance(answer, dict) or isinstance(answer.get("score"), bool):
        return None
    try:
        score = float(answer.get("score"))
    except (TypeError, ValueError):
        return None
    if not 0 <= score <= 100:  # also rejects nan
        return None
    reason = answer.get("reason")
    return {"score": score, "reason": reason if isinstance(reason, str) else ""}


class ClairJudge(OpenAIExpert):
    """OpenAIExpert with CLAIR's prompt and answer format: review(items) -> one {"score", "reason"}
    or None per item; Item.draft is the candidate caption, Item.truth the reference captions."""
    name = "clair"
    parse = staticmethod(parse_score)

    def request(self, item: Item) -> tuple[str, list]:
        prompt = CLAIR_PROMPT.format(candidates=f"- {item.draft}",
                                     references="\n".join(f"- {r}" for r in item.truth))
        key = hashlib.sha256(json.dumps(["clair", self.model, prompt]).encode()).hexdigest()
        return key, [{"role": "user", "content": [{"type": "text", "text": prompt}]}]


def clair(judge: ClairJudge, captions: list[str], references: list[list[str]]) -> dict:
    """Judge every caption: the mean score over the judged ones, per-caption results, counts."""
    results = judge.review([Item(c, list(r)) for c, r in zip(captions, references)])
    scores = [r["score"] for r in results if r is not None]
    counts = {k: judge.counts[k] for k in "requests retries failed malformed cache_hits".split()}
    return {"clair": sum(scores) / len(scores) if scores else None, "n_judged": len(scores),
            "n_skipped": len(results) - len(scores), **counts, "per_caption": results}

# --------------------------------------------------------------------------------------------------
# Reference-free statistics


def words_of(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def distinct(words: list[str], n: int) -> float | None:
    """Distinct n-grams / n-grams; None with fewer than n words."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_sentences(text: str) -> float | None:
    """Sentences equal (as word lists) to an earlier one of the text / sentences; None: no words."""
    sentences = [tuple(w) for w in map(words_of, re.split(r"[.!?]+", text)) if w]
    repeats = sum(s in sentences[:i] for i, s in enumerate(sentences))
    return repeats / len(sentences) if sentences else None


def statistics(captions: list[str]) -> dict:
    """Mean words, distinct_1, distinct_2 and repeated_sentences over the captions (module doc)."""
    per = {"words": [], "distinct_1": [], "distinct_2": [], "repeated_sentences": []}
    for caption in captions:
        words = words_of(caption)
        values = (len(words), distinct(words, 1), distinct(words, 2), repeated_sentences(caption))
        for name, value in zip(per, values):
            if value is not None:
                per[name].append(value)
    means = {name: sum(v) / len(v) if v else None for name, v in per.items()}
    return means | {"n_captions": len(captions)}

# --------------------------------------------------------------------------------------------------
# Input files


def load_captions(path) -> list[tuple[str, str, int]]:
    """(id, caption, line number) of each line of a captions JSONL file; a bad line: a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: captions file not found; give --captions a JSONL file of "
                        f"{{\"id\", \"caption\"}}")
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    rows, seen = [], {}
    for number, raw in enumerate(lines, start=1):
        where = f"{path}: line {number}"
        text = _decode_utf8(raw, path, number)
        try:
            record = json.loads(text)
        except ValueError as e:
            problem = "is blank" if not text.strip() else f"is not valid JSON ({e})"
            raise DataError(f"{where} {problem}; every line must be one "
                            f"{{\"id\": ..., \"caption\": ...}} object")
        key = record.get("id") if isinstance(record, dict) else None
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise DataError(f"{where}: field 'id' is missing or not a string / integer; give each "
                            f"line the \"id\" of its LLaVA record")
        caption = record.get("caption")
        if not isinstance(caption, str):
            raise DataError(f"{where}: field 'caption' is missing or not a string; fix or remove "
                            f"the line")
        key = str(key)
        if key in seen:
            raise DataError(f"{where}: id {key!r} already appeared on line {seen[key]}; give each "
                            f"caption once")
        seen[key] = number
        rows.append((key, caption, number))
    return rows


def load_references(path) -> dict[str, list[str]]:
    """id -> reference captions (the first assistant turn of each record with that id) of a LLaVA /
    ShareGPT4V JSON list; records checked as data/loaders.load_llava_json does; no images."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: references file not found; give --references a LLaVA-format "
                        f"JSON list")
    references: dict[str, list[str]] = {}
    for index, record in enumerate(_json_list(path, "conversation records")):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index}: expected a JSON object, got "
                            f"{type(record).__name__}")
        _, caption = _first_turns(record, f"record {index}", path)
        references.setdefault(str(record.get("id", index)), []).append(caption.strip())
    return references


# --------------------------------------------------------------------------------------------------
# Command line


@dataclass
class JudgeConfig:
    captions: str = option("", "JSONL, one {\"id\", \"caption\"} per line")
    references: str = option("", "LLaVA-format JSON whose records' ids match the captions' "
                             "(needed for the judge)")
    judge: bool = option(True, "ask the CLAIR judge; --no-judge: reference-free statistics only")
    model: str = option("o4-mini", "judge model name at the endpoint")
    base_url: str = option("", "OpenAI-compatible endpoint (empty: api.openai.com); key from "
                           "OPENAI_API_KEY")
    cache: str = option("judge_cache.jsonl", "append-only answer cache (empty: none)")
    max_in_flight: int = option(8, "requests at once", at_least=1)
    max_retries: int = option(6, "retries of one request (429, 5xx, timeouts) before it is skipped",
                              at_least=0)
    backoff: float = option(1.0, "first retry delay in seconds (doubles each retry)", at_least=0)
    json: str = option("", "write the results here")


def run(cfg: JudgeConfig) -> dict:
    if not cfg.captions:
        raise DataError("tools/judge.py: give --captions FILE.jsonl")
    rows = load_captions(cfg.captions)
    captions = [caption for _, caption, _ in rows]
    result = {"n_captions": len(rows), "statistics": statistics(captions)}
    if cfg.judge:
        if not cfg.references:
            raise DataError("tools/judge.py: the judge needs --references LLAVA.json "
                            "(or pass --no-judge)")
        references = load_references(cfg.references)
        for key, _, number in rows:
            if key not in references:
                raise DataError(f"{cfg.captions}: line {number}: id {key!r} is not the id of any "
                                f"record in {cfg.references}; fix the id, or remove the line")
        check_endpoint(cfg.base_url, "--base-url", cfg.cache)  # before any request
        judge = ClairJudge(cfg.model, cfg.base_url or None, cfg.cache or None, cfg.max_in_flight,
                           max_retries=cfg.max_retries, backoff=cfg.backoff)
        scored = clair(judge, captions, [references[key] for key, _, _ in rows])
        per_caption = scored.pop("per_caption")
        result["judge"] = {"metric": "CLAIR", "model": cfg.model, **scored}
        result["per_caption"] = [{"id": key, **(r or {"score": None, "reason": None})}
                                 for (key, _, _), r in zip(rows, per_caption)]
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def summary(result: dict) -> str:
    s = result["statistics"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"{result['n_captions']} captions: words {fmt(s['words'])}, distinct-1 "
             f"{fmt(s['distinct_1'])}, distinct-2 {fmt(s['distinct_2'])}, repeated sentences "
             f"{fmt(s['repeated_sentences'])}"]
    if "judge" in result:
        j = result["judge"]
        lines.append(f"CLAIR ({j['model']}): {fmt(j['clair'])} over {j['n_judged']} judged, "
                     f"{j['n_skipped']} skipped ({j['malformed']} malformed, {j['failed']} "
                     f"failed); {j['requests']} requests, {j['cache_hits']} from the cache")
    return "\n".join(lines)


def main(argv=None) -> dict:
    cfg = parse_config(JudgeConfig, argv, description=__doc__)
    check_writable(cfg.json, "--json")
    try:
        result = run(cfg)
    except (DataError, ExpertError) as e:
        sys.exit(f"error: {e}")
    print(summary(result))
    return result


if __name__ == "__main__":
    run_main(main)
