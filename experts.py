"""experts.py: the expert reviewers of Stage II (Section 3.3, Appendix 7 of arXiv 2510.19871).

An expert reads a draft caption (with the image and the ground truth) and answers "right", or a
list of {"org": wrong segment of the draft, "target": its correction} pairs. Three experts share
`review(items) -> list of reviews`; a review is RIGHT, a list of pairs, or None (no usable answer):

    OracleExpert  the default, for the shapes world: knows the scene graph; free, offline, exact
    OpenAIExpert  any OpenAI-compatible chat endpoint (o4-mini in the paper); retried, cached
    AlignExpert   no LLM, no scene: equal-length blocks aligning the draft with the ground truth

Every pair then goes through `validate_pairs`, the paper's rules on token ids: org and target have
the same token count and org occurs exactly once in the draft. Rejections are counted by reason.
"""
from __future__ import annotations

import base64
import glob
import hashlib
import io
import json
import os
import random
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from difflib import SequenceMatcher
from itertools import groupby
from typing import Any

from PIL import Image
from tqdm import tqdm

from data import shapes
from data.score import normalise

RIGHT = "right"  # the review of a draft with nothing to correct


@dataclass
class Item:
    """One draft to review."""
    draft: str                  # the model's caption
    truth: str                  # the ground-truth caption (a reference only, as in the paper)
    scene: dict | None = None   # the scene graph (OracleExpert)
    image: Any = None           # a PIL image or encoded image bytes (OpenAIExpert)


class ExpertError(RuntimeError):
    """A problem no retry can fix (no API key, key refused, unknown model): it stops the run."""


class Expert:
    """review(items) -> one review per item (review_one(item) each); `counts`: statistics."""
    name = "expert"

    def __init__(self):
        self.counts: Counter = Counter()

    def review(self, items: list[Item]) -> list:
        return [self.review_one(item) for item in items]

# Pair validation, shared by all experts (the rules of the paper's expert prompt, on token ids) ---


def occurrences(sequence: list, segment: list) -> list[int]:
    """Start positions of `segment` as a contiguous run inside `sequence`."""
    n = len(segment)
    return [i for i in range(len(sequence) - n + 1) if sequence[i:i + n] == segment] if n else []


def validate_pairs(pairs, draft_ids, tokenizer, counts: Counter) -> list[tuple[int, list[int]]]:
    """Section 3.3's rules: keep a pair only if org and target have the same token count and org
    occurs exactly once in draft_ids (the answer's ids, cut at the first end-of-text). Returns
    (start, target ids) per kept pair, by start. Counts pairs_proposed, pairs_kept and
    rejected_<reason>: malformed (not a dict of two strings), empty, length_mismatch, unchanged,
    unknown_word (target words outside the vocabulary), absent, repeated (org occurs more than
    once), overlap (with an earlier kept pair)."""
    draft_ids = [int(i) for i in draft_ids]
    if tokenizer.eos_id in draft_ids:
        draft_ids = draft_ids[:draft_ids.index(tokenizer.eos_id)]
    kept, taken = [], set()
    for pair in pairs:
        counts["pairs_proposed"] += 1
        if not (isinstance(pair, dict) and isinstance(pair.get("org"), str)
                and isinstance(pair.get("target"), str)):
            counts["rejected_malformed"] += 1
            continue
        org, target = tokenizer.encode(pair["org"]), tokenizer.encode(pair["target"])
        starts = occurrences(draft_ids, org)
        reason = ("empty" if not org else "length_mismatch" if len(org) != len(target)
                  else "unchanged" if org == target
                  # LLaDA's byte-level BPE has no unknown id
                  else "unknown_word" if getattr(tokenizer, "unk_id", None) in target
                  else "absent" if not starts else "repeated" if len(starts) > 1
                  else "overlap" if taken & set(range(starts[0], starts[0] + len(org))) else None)
        if reason:
            counts["rejected_" + reason] += 1
            continue
        counts["pairs_kept"] += 1
        taken |= set(range(starts[0], starts[0] + len(target)))
        kept.append((starts[0], target))
    return sorted(kept)


def smallest_unique_span(words: list[str], start: int, end: int) -> tuple[int, int]:
    """The shortest window [s, e) around the changed words [start, end) whose words occur exactly
    once in the draft (Section 3.3: pairs are found by their text); of equal lengths, the leftmost.
    The whole draft always qualifies, so there is an answer."""
    for size in range(end - start, len(words) + 1):
        for s in range(max(0, end - size), min(start, len(words) - size) + 1):
            if len(occurrences(words, words[s:s + size])) == 1:
                return s, s + size
    raise AssertionError("unreachable: the whole draft occurs once")


def pairs_from_rewrite(words: list[str], fixed: list[str]) -> list[dict]:
    """An equal-length rewrite of a draft's words -> Section 3.3's {org, target} pairs: each run of
    changed words, widened (smallest_unique_span) only as far as its org needs to occur exactly
    once in the draft, so as few unchanged words as the uniqueness rule allows enter Eq. 4;
    overlapping spans are merged."""
    assert len(words) == len(fixed), "an equal-length rewrite"
    changed = [i for i, (a, b) in enumerate(zip(words, fixed)) if a != b]
    # maximal runs of consecutive changed positions (position - rank is constant along a run)
    runs = [[i for _, i in run] for _, run in groupby(enumerate(changed), lambda r: r[1] - r[0])]
    spans = []
    for run in runs:
        start, end = smallest_unique_span(words, run[0], run[-1] + 1)
        if spans and start < spans[-1][1]:  # overlaps the last span: merge (still unique)
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    return [{"org": " ".join(words[s:e]), "target": " ".join(fixed[s:e])} for s, e in spans]

# The oracle: the shapes world's expert ------------------------------------------------------------


def true_sentences(scene: dict) -> list[tuple[tuple, list[str]]]:
    """Every true sentence the templates can say about `scene`, as (claim, words without ".")."""
    objects = scene["objects"]
    n = len(objects)
    texts = [template.format(size=o["size"], colour=o["colour"], shape=o["shape"],
                             pos=shapes.POSITIONS[o["row"] * shapes.GRID + o["col"]])
             for o in objects for template in shapes.OBJECT_TEMPLATES]
    if 1 <= n <= len(shapes.NUMBERS):
        templates = shapes.SINGULAR_COUNT_TEMPLATES if n == 1 else shapes.PLURAL_COUNT_TEMPLATES
        texts += [t.format(many=shapes.NUMBERS[n - 1]) for t in templates]
    names = [(o["colour"], o["shape"]) for o in objects]
    unique = [name for name in names if names.count(name) == 1]  # the captions' rule: unique names
    relate = shapes.RELATION_TEMPLATE.format
    texts += [relate(colour_a=a[0], shape_a=a[1], rel=rel, colour_b=b[0], shape_b=b[1])
              for a in unique for b in unique if a != b for rel in shapes.RELATIONS]
    sentences = [(shapes.parse_sentence(words), words) for words in map(str.split, texts)]
    return [(parsed[0], words) for parsed, words in sentences
            if parsed is not None and shapes.claim_holds(parsed[0], scene)]


class OracleExpert(Expert):
    """Section 3.3's expert for the shapes world: knows the scene; makes each sentence of the draft
    true and grammatical with minimal equal-length edits. A sentence (the words between two ".") is
    right when it parses (data/shapes.py templates), its claim holds in the scene, and no earlier
    sentence made the same claim. A wrong sentence of n words is replaced by the true sentence of n
    words (or two true sentences joined by ".", for a lost "."; a last sentence without "." may gain
    one) that, first, makes no claim already made elsewhere in the draft (when every rewrite does, a
    false sentence still becomes a true one) and, second, changes the fewest words. Right sentences
    are never touched: the ground truth's wording and order never leak in. A sentence with no true
    rewrite of its length is left alone and counted (unrepairable_sentences); so is a repeated
    sentence whose only rewrites are repeats too."""
    name = "oracle"

    def review_one(self, item: Item):
        if item.scene is None:
            raise ValueError("the oracle expert needs each item's scene graph (Item.scene)")
        words = normalise(item.draft)
        spans = shapes.sentence_spans(words)
        if not spans:
            self.counts["empty_drafts"] += 1
            return []
        stated, wrong = set(), []  # right sentences' claims; wrong ones' (start, end, true repeat)
        for start, end in spans:
            parsed = shapes.parse_sentence(words[start:end])
            true = parsed is not None and shapes.claim_holds(parsed[0], item.scene)
            if true and parsed[0] not in stated:
                stated.add(parsed[0])
            else:
                wrong.append((start, end, true))
        if not wrong:
            return RIGHT
        truths = true_sentences(item.scene)
        fixed = list(words)
        for start, end, is_repeat in wrong:
            best = self.repair(words[start:end], truths, stated, unterminated=end == len(words))
            if best is None or (is_repeat and best[0] & stated):
                self.counts["unrepairable_sentences"] += 1
                continue
            claims, new_words = best
            fixed[start:end] = new_words
            stated |= claims
        return pairs_from_rewrite(words, fixed)

    @staticmethod
    def repair(sentence: list[str], truths, stated: set, unterminated: bool = False):
        """(claims, words) of the best same-length true rewrite of `sentence`, or None (none is).
        unterminated: the sentence ends the draft without a ".", so a rewrite may end with one."""
        by_length: dict[int, list] = {}
        for claim, words in truths:
            by_length.setdefault(len(words), []).append((claim, words))
        candidates = []
        for end in ([], ["."]) if unterminated else ([],):
            n = len(sentence) - len(end)
            candidates += [({claim}, words + end) for claim, words in by_length.get(n, [])]
            for length, firsts in by_length.items():  # two sentences joined by "." (a lost ".")
                candidates += [({c1, c2}, w1 + ["."] + w2 + end) for c1, w1 in firsts
                               for c2, w2 in by_length.get(n - 1 - length, []) if c1 != c2]
        if not candidates:
            return None
        edits = lambda words: sum(a != b for a, b in zip(sentence, words))  # noqa: E731
        return min(candidates, key=lambda c: (bool(c[0] & stated), edits(c[1])))  # new claims first

# Alignment with the ground truth: for data without an LLM (and without a scene graph) -------------


class AlignExpert(Expert):
    """Section 3.3's review by a word alignment (difflib) of the draft with the ground truth.

    Weakness: the ground truth is taken as the only right caption. A true sentence the draft says in
    other words or order is "corrected" towards the ground truth's wording: the model learns its
    style, not its own mistakes. Unequal blocks (insertions, deletions, replacements of another
    length) are skipped and counted (unequal_blocks)."""
    name = "align"

    def review_one(self, item: Item):
        draft, truth = normalise(item.draft), normalise(item.truth)
        if draft == truth:
            return RIGHT
        fixed = list(draft)
        for op, i1, i2, j1, j2 in SequenceMatcher(None, draft, truth, autojunk=False).get_opcodes():
            if op == "replace" and i2 - i1 == j2 - j1:
                fixed[i1:i2] = truth[j1:j2]
            elif op != "equal":
                self.counts["unequal_blocks"] += 1
        return pairs_from_rewrite(draft, fixed)

# An OpenAI-compatible chat endpoint (o4-mini in the paper) ----------------------------------------

PROMPT_RULES = """You review a draft image caption written by another model. You get the image, \
a ground-truth caption and the draft.

Find the errors in the draft:
- hallucinations: objects, attributes, counts, positions or relations that contradict the image;
- syntactic chaos: repeated words, incoherent or ungrammatical phrases.

Rules:
1. Judge the draft against the image. The ground truth is only a reference: describing things in \
another order or in other words is not an error.
2. Each correction replaces one segment of the draft ("org") with a corrected segment ("target") \
that has EXACTLY the same number of words and punctuation marks.
3. Keep every edit minimal and local: change only what is wrong. Never rephrase, reorder or \
shorten correct text, and do not copy the ground truth's wording.
4. Copy each "org" verbatim from the draft. It must occur exactly once in the draft: include \
neighbouring words if needed to make it unique.

If the draft has no errors, answer with the single word: right
Otherwise answer with only a JSON list, for example:
[{"org": "a red circle", "target": "a blue circle"}]"""

RETRY_STATUS = {408, 409, 429}  # and every 5xx
MAX_BACKOFF, MIN_IMAGE_SIDE = 60.0, 384  # seconds between retries; pixels (smaller are upscaled)
NO_KEY = ("the openai expert needs OPENAI_API_KEY in the environment (for a local server any value "
          "works, e.g. OPENAI_API_KEY=local)")


def parse_review(text: str):
    """An expert's answer (Section 3.3) -> RIGHT, a list of pairs, or None (malformed). Code fences
    and text around the JSON list are tolerated; an empty list means right."""
    text = (text or "").strip()
    if fenced := re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL):
        text = fenced.group(1).strip()
    if text.strip("\"'`.!* \n").lower() == RIGHT:
        return RIGHT
    try:
        answer = json.loads(text)
    except ValueError:
        start, end = text.find("["), text.rfind("]")
        try:
            answer = json.loads(text[start:end + 1]) if 0 <= start < end else None
        except ValueError:
            return None
    if isinstance(answer, dict):  # {"org": ..., "target": ...} alone, or {"edits": [...]}
        lists = [v for v in answer.values() if isinstance(v, list)]
        answer = [answer] if "org" in answer else lists[0] if len(lists) == 1 else None
    if isinstance(answer, str) and answer.strip().lower() == RIGHT:
        return RIGHT
    return (answer or RIGHT) if isinstance(answer, list) else None


def image_payload(image) -> tuple[bytes, str, str]:
    """(digest source, mime type, base64 data) of an image: encoded bytes go as they are; a PIL
    image is upscaled (nearest neighbour) until its short side is >= MIN_IMAGE_SIDE, sent as PNG."""
    if isinstance(image, (bytes, bytearray)):
        mime = "image/jpeg" if image[:3] == b"\xff\xd8\xff" else "image/png"
        return bytes(image), mime, base64.b64encode(image).decode()
    image = image.convert("RGB")
    factor = -(-MIN_IMAGE_SIDE // min(image.size))  # ceil: 1 (a copy) for large images
    image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixels = f"{image.mode} {image.size}".encode() + image.tobytes()  # not the PNG encoder's bytes
    return pixels, "image/png", base64.b64encode(buffer.getvalue()).decode()


class AnswerCache:
    """Append-only JSONL of expert answers, one {"key", "model", "draft", "answer"} per line, keyed
    by the request's sha256: `answers` (key -> answer) and `fields` (key -> the other fields). Each
    answer is flushed and fsynced on arrival (a crash loses at most the line being written); a
    torn or unreadable line is skipped on load, counted in `bad_lines`. No secret is written."""

    def __init__(self, path: str | None):
        self.path, self.answers, self.fields, self.bad_lines = path, {}, {}, 0
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                for line in filter(bytes.strip, f.read().split(b"\n")):  # the non-blank lines
                    try:
                        record = json.loads(line.decode("utf-8"))
                        self.answers[record["key"]] = record.pop("answer")
                        self.fields[record.pop("key")] = record
                    except (ValueError, KeyError, TypeError, AttributeError):
                        self.bad_lines += 1

    def get(self, key: str):
        return self.answers.get(key)

    def put(self, key: str, answer: str, **fields) -> None:
        self.answers[key] = answer
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        line = json.dumps({"key": key, **fields, "answer": answer}) + "\n"
        with open(self.path, "ab+") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn last line: start a fresh one so ours stays readable
                    line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


def rank_cache_path(path: str, rank: int) -> str:
    """Where rank `rank` > 0 of a multi-process Stage II run appends its new answers: only rank 0
    writes the shared cache, so no two processes ever append to one file."""
    return f"{path}.rank{rank}"


def merge_rank_caches(path: str) -> int:
    """Move the answers of every per-rank file (rank_cache_path) into the cache at `path`, then
    delete those files; returns how many were new."""
    cache, moved = AnswerCache(path), 0
    for part in map(AnswerCache, sorted(glob.glob(glob.escape(path) + ".rank*"))):
        for key, answer in part.answers.items():
            if cache.get(key) is None:
                cache.put(key, answer, **part.fields[key])
                moved += 1
        os.remove(part.path)
    return moved


class OpenAIExpert(Expert):
    """Any OpenAI-compatible chat endpoint through the `openai` package (o4-mini in the paper).

    The key is read from OPENAI_API_KEY only when a request must be made, never printed or saved.
    A request sends the prompt's rules, the ground truth, the draft and the image (a base64 data
    URL, image_payload). Connection errors, timeouts, 408/409/429 and 5xx are retried with
    exponential backoff (honouring Retry-After, at most MAX_BACKOFF seconds), then skipped and
    counted (failed); other 4xx are skipped and counted (http_<code>), but 401/403/404 stop the
    run. Malformed answers are counted, skipped. At most `max_in_flight` requests run at once.
    Answers are cached by sha256(model, prompt, image, draft, truth): a rerun pays nothing."""
    name = "openai"
    parse = staticmethod(parse_review)  # text -> review or None; tools/judge.py swaps in its own

    def __init__(self, model: str = "o4-mini", base_url: str | None = None,
                 cache_path: str | None = None, max_in_flight: int = 8, max_retries: int = 6,
                 backoff: float = 1.0, timeout: float = 120.0):
        super().__init__()
        self.model, self.base_url, self.max_in_flight = model, base_url, max(1, max_in_flight)
        self.max_retries, self.backoff, self.timeout = max_retries, backoff, timeout
        self.cache, self._client, self._lock = AnswerCache(cache_path), None, threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:  # counts are updated from the worker threads
            self.counts[name] += 1

    def request(self, item: Item) -> tuple[str, list]:
        """(cache key, chat messages) of one item."""
        prompt = f"{PROMPT_RULES}\n\nGround truth: {item.truth}\nDraft: {item.draft}"
        content, digest = [{"type": "text", "text": prompt}], ""
        if item.image is not None:
            pixels, mime, data = image_payload(item.image)
            digest = hashlib.sha256(pixels).hexdigest()
            url = f"data:{mime};base64,{data}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        identity = json.dumps([self.model, prompt, digest, item.draft, item.truth])
        return hashlib.sha256(identity.encode()).hexdigest(), [{"role": "user", "content": content}]

    def ask(self, messages) -> str | None:
        """One answer's text, or None once the retries are spent (or on a non-retryable 4xx)."""
        import openai
        if self._client is None:  # made on the first request: a cached rerun needs no key
            key = os.environ.get("OPENAI_API_KEY")
            if not key:
                raise ExpertError(NO_KEY)
            self._client = openai.OpenAI(api_key=key, base_url=self.base_url or None, max_retries=0,
                                         timeout=self.timeout)
        for attempt in range(self.max_retries + 1):
            self._count("requests")
            wait = 0.0
            try:
                response = self._client.chat.completions.create(model=self.model, messages=messages)
                return (response.choices[0].message.content or "") if response.choices else ""
            except openai.APIStatusError as err:
                status = err.status_code
                if status in (401, 403):
                    raise ExpertError(f"the expert endpoint refused the key (HTTP {status}): "
                                      "check OPENAI_API_KEY") from None
                if status == 404:
                    raise ExpertError(f"the expert endpoint knows no model {self.model!r} or no "
                                      "chat API (HTTP 404): check --expert-model and "
                                      "--expert-base-url (tools/judge.py: --model, --base-url)"
                                      ) from None
                if status not in RETRY_STATUS and status < 500:
                    self._count(f"http_{status}")
                    return None
                try:
                    wait = float(err.response.headers.get("retry-after", 0))
                except (TypeError, ValueError):
                    pass
            except openai.APIConnectionError:  # includes timeouts
                pass
            except openai.APIError:  # a response the SDK cannot read
                self._count("bad_responses")
                return None
            if attempt == self.max_retries:
                break
            self._count("retries")
            delay = min(MAX_BACKOFF, max(wait, self.backoff * 2 ** attempt))
            time.sleep(delay * (1 + 0.25 * random.random()))  # jitter: no lockstep retries
        self._count("failed")
        return None

    def review(self, items: list[Item]) -> list:
        keyed = [(*self.request(item), item.draft) for item in items]  # (key, messages, draft)
        self.counts.update("cache_hits" for key, *_ in keyed if self.cache.get(key) is not None)
        todo = {key: (messages, draft) for key, messages, draft in keyed  # each new key once
                if self.cache.get(key) is None}
        if todo:
            pool = ThreadPoolExecutor(self.max_in_flight)
            futures = {pool.submit(self.ask, messages): (key, draft)
                       for key, (messages, draft) in todo.items()}
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc=self.name,
                                   dynamic_ncols=True):
                    key, draft = futures[future]
                    text = future.result()
                    if text is not None:
                        self.cache.put(key, text, model=self.model, draft=draft)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        texts = [self.cache.get(key) for key, *_ in keyed]
        reviews = [None if text is None else self.parse(text) for text in texts]
        self.counts.update("malformed" for text, review in zip(texts, reviews)
                           if text is not None and review is None)
        return reviews


def check_endpoint(base_url: str | None, flag: str, cache_path: str | None = None) -> None:
    """Stop before any slow or paid work when no request could succeed: OPENAI_API_KEY unset, or an
    OpenAI-compatible endpoint that accepts no connection (a wrong URL, a server not started): one
    TCP connection (10 s at most), no request. Skipped when cache_path already holds answers (a
    rerun may need no request at all); the connection is not tried when a proxy carries it."""
    shown = base_url or "https://api.openai.com/v1"  # the openai client's own default
    url = urllib.parse.urlsplit(shown)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        port = None
    if url.scheme not in ("http", "https") or not url.hostname or port is None:
        raise ExpertError(f"{flag} {shown!r} is not an http(s) URL with a host (and a valid "
                          f"port); e.g. http://127.0.0.1:8000/v1")
    if cache_path and os.path.isfile(cache_path) and os.path.getsize(cache_path) > 0:
        return
    if not os.environ.get("OPENAI_API_KEY"):
        raise ExpertError(NO_KEY)
    if url.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(url.hostname):
        return
    try:
        socket.create_connection((url.hostname, port), timeout=10.0).close()
    except OSError as err:
        raise ExpertError(f"{flag} {shown}: cannot connect to {url.hostname}:{port} "
                          f"({err.strerror or err}); start the server or fix {flag}") from None


def make_expert(kind: str, model: str = "o4-mini", base_url: str | None = None,
                cache_path: str | None = None, max_in_flight: int = 8) -> Expert:
    """The expert of Section 3.3 by name: oracle, align or openai."""
    experts = {"oracle": OracleExpert, "align": AlignExpert,
               "openai": lambda: OpenAIExpert(model, base_url, cache_path, max_in_flight)}
    if kind not in experts:
        raise ValueError(f"unknown expert {kind!r}: choose oracle, openai or align")
    return experts[kind]()
