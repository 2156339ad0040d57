"""TEMPORARY stand-in (helper is writing the real one)."""
SPECIALS = ["<pad>", "<mask>", "<eos>", "<unk>", "<image>"]
class WordTokenizer:
    def __init__(self, words):
        self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.mask_id, self.eos_id, self.unk_id, self.image_id = range(5)
        self.eot_id = self.eos_id
        self.vocab_size = len(self.words)
        self.special_ids = list(range(5))
        self.ordinary_ids = list(range(5, self.vocab_size))
    @classmethod
    def for_shapes_world(cls):
        from data.shapes import VOCAB
        return cls(sorted(set(VOCAB) | {"describe", "image"}))
    def encode(self, text, stats=None):
        return [self.index.get(w, self.unk_id) for w in text.split()]
    def decode(self, ids, skip_special=True):
        return " ".join(self.words[int(i)] for i in ids if not (skip_special and int(i) < 5))
    def to_dict(self):
        return {"kind": "word", "words": self.words[5:]}
def tokenizer_from_dict(d):
    return WordTokenizer(d["words"])
