"""score.py: the exact scorer of shapes-world captions against their scene graphs.

A caption is normalised (lowercase; "." and "," split off words; whitespace collapsed) and split
into sentences at "." (a non-empty trailing fragment without "." is a sentence too). A sentence
*parses* if it matches one of the caption templates of data/shapes.py word for word; it then makes
exactly one claim: an object claim (size, colour, shape at a position), a count claim, or a spatial
relation claim, each of which is true or false of the scene.

    factuality = true claims / (claims + unparsed sentences): each unparsed sentence counts as a
                 false claim, so chaos cannot hide (0 with no sentence at all)
    coverage   = fraction of the scene's objects named by at least one true object claim
    syntax     = parsed sentences / sentences (0 with no sentence)
    repetition = repeated sentences / sentences (0 with no sentence); a sentence is repeated if the
                 same normalised sentence, or the same claim in another template, came earlier
    headline   = 100 * harmonic_mean(factuality, coverage) * (1 - repetition), in [0, 100]

Ground-truth captions score factuality 1, coverage 1, syntax 1, repetition 0 and headline 100. The
scorer never raises on any string: garbage simply scores 0.
"""
from __future__ import annotations

from data.shapes import cell_of, claim_holds, parse_sentence, sentence_spans

METRICS = ["headline", "factuality", "coverage", "syntax", "repetition",
           "n_sentences", "n_claims", "n_true", "n_unparsed"]


def normalise(text: str) -> list[str]:
    """Lowercase words with "." and "," as words of their own ("circle." -> "circle", ".")."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = str(text).lower()
    for mark in (".", ","):
        text = text.replace(mark, f" {mark} ")
    return text.split()


def _harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def score_caption(text: str, scene: dict) -> dict:
    """All METRICS of one caption against its scene graph (see the module docstring)."""
    words = normalise(text)
    sentences = [tuple(words[s:e]) for s, e in sentence_spans(words)]
    n_claims = n_true = n_unparsed = n_repeated = 0
    seen_sentences, seen_claims = set(), set()  # normalised sentences (tuples of words), claims
    covered: set[tuple[int, int]] = set()  # cells of true object claims (one object per cell)
    for sentence in sentences:
        parsed = parse_sentence(list(sentence))
        claim = parsed[0] if parsed is not None else None
        # Both: a verbatim repeat of garbage is a repeat, and so is one fact in another template.
        n_repeated += sentence in seen_sentences or (claim is not None and claim in seen_claims)
        seen_sentences.add(sentence)
        if claim is None:
            n_unparsed += 1
            continue
        seen_claims.add(claim)
        n_claims += 1
        if claim_holds(claim, scene):
            n_true += 1
            if claim[0] == "object":
                covered.add(cell_of(claim[4]))
    n = len(sentences)
    factuality = n_true / (n_claims + n_unparsed) if n else 0.0
    coverage = len(covered) / len(scene["objects"]) if scene["objects"] else 0.0
    syntax = n_claims / n if n else 0.0
    repetition = n_repeated / n if n else 0.0
    return dict(headline=100 * _harmonic_mean(factuality, coverage) * (1 - repetition),
                factuality=factuality, coverage=coverage, syntax=syntax, repetition=repetition,
                n_sentences=n, n_claims=n_claims, n_true=n_true, n_unparsed=n_unparsed)


def score_captions(texts: list[str], scenes: list[dict]) -> dict:
    """Mean of every metric over captions paired with their scenes, plus n_captions."""
    assert len(texts) == len(scenes), "one scene per caption"
    scores = [score_caption(t, s) for t, s in zip(texts, scenes)]
    means = {m: sum(s[m] for s in scores) / len(scores) if scores else 0.0 for m in METRICS}
    return {**means, "n_captions": len(scores)}
