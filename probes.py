"""Grammar probes: minimal pairs made from held-out sentences, one rule per language.

Bits per byte says the model predicts a language's bytes better, not that it learned its
grammar. A probe pair is a held-out sentence and the same sentence broken by one rule a reader
of the language never breaks; the model passes a pair when it gives the original the higher
log-probability. At 135M parameters benchmarks such as KoBEST sit at chance, while rules like
these can move (the BLiMP idea: Warstadt et al. 2020, arXiv:1912.00582).

    make_probes("ko", texts)  # {"ko_particles": [Pair...], "ko_word_order": [...]}

A pair is (context, good, bad): the words before the change, and the original and the broken
continuation (the changed word and the two after it). The context is common to both, so
comparing the two continuations' summed log-probabilities is comparing the whole windows' -
and it is exactly the question lm-evaluation-harness asks of a `multiple_choice` task with
`doc_to_text: context` and `doc_to_choice: [good, bad]` (`acc`; `acc_norm` divides by the
continuation's length in characters). evaluate.probe_scores computes the same numbers.

Two things would let a model that knows nothing pass, and both are taken out:
- Token counts. A summed log-probability charges every token, and a merged tokenizer writes a
  frequent, correct form (사과를) in fewer tokens than a broken one (사과 + 을): random new rows
  scored 95.5% on Korean particles (docs/probe-smoke.txt). So each sentence's pair is drawn
  from its candidate changes whose two sides the run's tokenizer writes in as many tokens
  (`keep=same_length(tok)`).
- Ties. A model that cannot tell two tokens apart (mean init: one row for all) gives both sides
  the same score, and lm-evaluation-harness's argmax gives a tie to the choice listed first.
  The original is listed first in half of the pairs (Pair.good_first), so a tie is a coin.
"""
import random
import re
import unicodedata
import zlib
from dataclasses import dataclass

CONTEXT_WORDS, AFTER_WORDS = 8, 2  # the window: 8 words before the change, 2 after it
JA_CONTEXT_CHARS, JA_AFTER_CHARS = 16, 6  # Japanese writes no spaces: characters instead
MAX_PAIRS = 1000  # per probe


@dataclass(frozen=True)
class Pair:
    context: str  # the held-out words before the change (never empty)
    good: str  # the original continuation
    bad: str  # the same with the rule broken

    def __post_init__(self):
        # spaces that end the context begin the continuations, as lm-evaluation-harness moves
        # them: the same split of the same text, whoever scores it
        n = len(self.context) - len(self.context.rstrip())
        if n:
            space = self.context[-n:]
            object.__setattr__(self, "context", self.context[:-n])
            object.__setattr__(self, "good", space + self.good)
            object.__setattr__(self, "bad", space + self.bad)

    @property
    def good_first(self) -> bool:
        """Whether the original is the first of the two choices (ties go to the first): so for
        half of the pairs, fixed by their text, whoever lists them."""
        return zlib.crc32(f"{self.context}\x01{self.good}\x01{self.bad}".encode()) % 2 == 0


def sentences(texts: list) -> list:
    """Held-out documents cut into sentences of 20 to 300 characters."""
    out = []
    for text in texts:
        for line in text.splitlines():
            for s in re.split(r"(?<=[.!?。！？])\s*", line):
                if 20 <= len(s.strip()) <= 300:
                    out.append(s.strip())
    return out


def word_pair(words: list, i: int, new_words: list) -> Pair:
    """The pair that replaces words[i:i + len(new_words)] with new_words."""
    n = len(new_words)
    context = " ".join(words[max(0, i - CONTEXT_WORDS):i])
    after = words[i + n:i + n + AFTER_WORDS]
    return Pair(context, " " + " ".join(words[i:i + n] + after),
                " " + " ".join(new_words + after))


def char_pair(text: str, start: int, end: int, new: str) -> Pair:
    """The pair that replaces text[start:end] with new (Japanese: a window in characters)."""
    context = text[max(0, start - JA_CONTEXT_CHARS):start]
    after = text[end:end + JA_AFTER_CHARS]
    return Pair(context, text[start:end] + after, new + after)


# ----------------------------------------------------------------------------------------------
# Korean: particle allomorphs

# (after a final consonant, after a vowel): the choice is phonological, fixed by the syllable
# before the particle; 로 is also what follows a final ㄹ
KO_PARTICLES = [("으로", "로"), ("은", "는"), ("이", "가"), ("을", "를"), ("과", "와")]
# particles only nouns take (never a verb stem): a stem seen with one of them is a noun, which
# tells the topic particle 는 in 나는 from the verb ending in 하는, 가는
KO_NOUN_ONLY = ("에서", "에게", "까지", "부터", "처럼", "보다", "의", "에")
FINAL_RIEUL = 8  # ㄹ's index among the 28 final consonants (0: none)


def final_consonant(syllable: str) -> int:
    """The final consonant's index (0: none) of a Hangul syllable, -1 for anything else:
    a syllable is 0xAC00 + (initial * 21 + vowel) * 28 + final."""
    code = ord(syllable) - 0xAC00
    return code % 28 if 0 <= code < 11172 else -1


def korean_particle(stem: str, pair: tuple) -> str:
    """The right form of a particle pair after stem."""
    final = final_consonant(stem[-1])
    if pair[1] == "로":
        return "로" if final in (0, FINAL_RIEUL) else "으로"
    return pair[1] if final == 0 else pair[0]


def split_punctuation(word: str) -> tuple:
    """("사과를", ".") for "사과를.": the word and what trails it."""
    core = word.rstrip(".,!?;:\"'”’)」』]")
    return core, word[len(core):]


def korean_nouns(sents: list) -> set:
    """Stems the held-out text shows with a particle only nouns take."""
    nouns = set()
    for s in sents:
        for word in s.split():
            core = split_punctuation(word)[0]
            nouns.update(core[:-len(p)] for p in KO_NOUN_ONLY
                         if core.endswith(p) and len(core) > len(p))
    return nouns


def korean_changes(words: list, nouns: set) -> list:
    """[(i, words[i] with its particle's other allomorph)] for each noun + particle in the
    right form (a wrong original is no pair), the first word excepted (no context)."""
    found = []
    for i, word in enumerate(words[1:], 1):
        core, trail = split_punctuation(word)
        for pair in KO_PARTICLES:  # 으로 before 로: the longest form first
            form = next((f for f in pair if core.endswith(f) and len(core) > len(f)), None)
            if form is None:
                continue
            stem = core[:-len(form)]
            if stem in nouns and final_consonant(stem[-1]) >= 0 \
                    and korean_particle(stem, pair) == form:
                found.append((i, stem + (pair[1] if form == pair[0] else pair[0]) + trail))
            break
    return found


def korean_particles(sents: list) -> list:
    """Per sentence, the pairs that swap a particle for its other allomorph (를 -> 을 after a
    vowel), where the stem is a noun (seen with a noun-only particle in the same held-out text)."""
    nouns = korean_nouns(sents)
    return [[word_pair(s.split(), i, [broken]) for i, broken in korean_changes(s.split(), nouns)]
            for s in sents]


# ----------------------------------------------------------------------------------------------
# Japanese: particle spelling

# the particles written with these kana are read o, wa, e; spelling them as read is an error
JA_PARTICLES = {"を": "お", "は": "わ", "へ": "え"}


def is_kanji_or_katakana(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" or c == "々" \
        or "\u30a0" <= c <= "\u30ff"


def japanese_particles(sents: list) -> list:
    """Per sentence, the pairs that write one particle を, は or へ as it is read (お, わ, え).
    を is written for the particle alone; は and へ count as particles only right after a
    kanji or katakana word (or in には, では, とは) and before a kanji, katakana, 、 (and へ
    before の, と): inside a word (はな, へや) they follow or precede hiragana."""
    candidates = []
    for s in sents:
        found = []
        for i, c in enumerate(s):
            if c not in JA_PARTICLES or i == 0:
                continue
            before, after = s[i - 1], s[i + 1] if i + 1 < len(s) else ""
            after_word = is_kanji_or_katakana(before) or (
                c == "は" and before in "にでと" and i > 1 and is_kanji_or_katakana(s[i - 2]))
            before_word = after and (is_kanji_or_katakana(after) or after == "、"
                                     or (c == "へ" and after in "のと"))
            if c == "を" or (after_word and before_word):
                found.append(char_pair(s, i, i + 1, JA_PARTICLES[c]))
        candidates.append(found)
    return candidates


# ----------------------------------------------------------------------------------------------
# Vietnamese: tones

# the five tone marks (combining, as NFD writes them); no mark is the sixth tone, ngang
VI_TONES = ["\u0300", "\u0301", "\u0303", "\u0309", "\u0323"]  # huyền sắc ngã hỏi nặng


def with_tone(syllable: str, tone: str) -> str:
    """syllable with its tone mark replaced by tone ('' for ngang), in NFC."""
    nfd = unicodedata.normalize("NFD", syllable)
    at = next(i for i, c in enumerate(nfd) if c in VI_TONES)
    rest = nfd[:at] + nfd[at + 1:]
    # the new mark goes after every mark of the same vowel (ệ is e, dot below, circumflex):
    # NFC then puts it in its canonical place, whatever the old mark's place was
    while at < len(rest) and unicodedata.combining(rest[at]):
        at += 1
    return unicodedata.normalize("NFC", rest[:at] + tone + rest[at:])


def vietnamese_tones(sents: list) -> list:
    """Per sentence, the pairs that give one syllable another tone: the other syllables of the
    held-out text it can become when there are any (a real word in the wrong place), else the
    syllables that are none."""
    known = {split_punctuation(w)[0].lower() for s in sents for w in s.split()}
    candidates = []
    for s in sents:
        words, found = s.split(), []
        for i, word in enumerate(words[1:], 1):
            core, trail = split_punctuation(word)
            old = next((c for c in unicodedata.normalize("NFD", core) if c in VI_TONES), None)
            if old is None:
                continue
            others = [with_tone(core, t) for t in VI_TONES + [""] if t != old]
            real = [o for o in others if o.lower() in known]
            found += [word_pair(words, i, [other + trail]) for other in real or others]
        candidates.append(found)
    return candidates


# ----------------------------------------------------------------------------------------------
# Every language: word order


def script_runs(text: str) -> list:
    """Japanese 'words' for the word-order control: maximal runs of kanji, of hiragana, of
    katakana, of anything else."""
    def kind(c: str) -> str:
        return ("k" if "\u4e00" <= c <= "\u9fff" or c == "々" else "h"
                if "\u3040" <= c <= "\u309f" else "t" if "\u30a0" <= c <= "\u30ff" else "x")
    kinds = "".join(map(kind, text))  # one letter per character
    return [text[m.start():m.end()] for m in re.finditer(r"(.)\1*", kinds)]


def word_order(sents: list, japanese: bool = False) -> list:
    """Per sentence, the pairs that swap two adjacent different words (not the first: the
    context is not empty); a weaker, generic control, in every language."""
    def swap(words: list, i: int, s: str) -> Pair:
        if not japanese:
            return word_pair(words, i, [words[i + 1], words[i]])
        start = sum(map(len, words[:i]))
        return char_pair(s, start, start + len(words[i]) + len(words[i + 1]),
                         words[i + 1] + words[i])
    candidates = []
    for s in sents:
        words = script_runs(s) if japanese else s.split()
        candidates.append([swap(words, i, s) for i in range(1, len(words) - 1)
                           if words[i] != words[i + 1]])
    return candidates


# ----------------------------------------------------------------------------------------------
# The probes of a language

GRAMMAR = {"ko": ("particles", korean_particles), "ja": ("particles", japanese_particles),
           "vi": ("tones", vietnamese_tones)}


def same_length(tok):
    """keep= for make_probes: the context's own tokens (tok, a tokenizers.Tokenizer) begin both
    sides' tokens, and both sides take as many. The first: lm-evaluation-harness scores
    what follows len(encode(context)) tokens of encode(context + side), which is the
    continuation only where no token spans the boundary (Japanese writes no space there)."""
    def encode(text: str) -> list:
        return tok.encode(text, add_special_tokens=False).ids

    def keep(pair: Pair) -> bool:
        context, good, bad = (encode(pair.context + side) for side in ("", pair.good, pair.bad))
        return len(good) == len(bad) and good[:len(context)] == bad[:len(context)] == context
    return keep


def make_probes(lang: str, texts: list, seed: int = 0, max_pairs: int = MAX_PAIRS,
                keep=lambda pair: True) -> dict:
    """{probe name: pairs} for a language's held-out texts: its grammar rule (if it has one)
    and word order. One pair per sentence (pairs from many sentences, not many from one),
    drawn from its candidates that keep accepts; at most max_pairs; the same for the same
    texts, seed and keep."""
    sents = sentences(texts)
    generators = {f"{lang}_word_order": lambda s: word_order(s, japanese=lang == "ja")}
    if lang in GRAMMAR:
        name, generate = GRAMMAR[lang]
        generators = {f"{lang}_{name}": generate, **generators}
    probes = {}
    for name, generate in generators.items():
        rng, pairs = random.Random(f"{seed}-{name}"), []
        for candidates in generate(sents):
            if len(pairs) == max_pairs:
                break
            rng.shuffle(candidates)  # a random one of those keep accepts, asked in turn
            pairs += next(([pair] for pair in candidates if keep(pair)), [])
        probes[name] = pairs
    return probes
