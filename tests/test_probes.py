"""probes.py: minimal pairs from held-out sentences; evaluate.probe_loglikelihoods scores them."""
import unicodedata

import pytest
import torch

import data
import probes
from evaluate import probe_accuracy, probe_loglikelihoods
from model import Llama, preset
from probes import Pair, make_probes


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = Llama(preset("tiny", vocab_size=49152, max_seq_len=512)).eval()
    for p in model.parameters():
        if p.ndim == 2:  # GPT-2's scale: logits that differ from token to token
            torch.nn.init.normal_(p, std=0.02)
    return model

# Nouns are told from verb stems by the held-out text itself: each of these nouns is also seen
# with a particle only nouns take (의, 에, 에서).
KO_NOUN_EVIDENCE = "사과의 책에 물의 학교에서 서울의 바다의 나의 우리의 말의 길에 집에 차에"


def ko_pairs(sentence: str) -> list:
    """(word, broken word) of every change the Korean rule makes in sentence."""
    words = sentence.split()
    nouns = probes.korean_nouns([sentence, KO_NOUN_EVIDENCE])
    return [(words[i], broken) for i, broken in probes.korean_changes(words, nouns)]


@pytest.mark.parametrize("sentence, good, bad", [
    ("오늘 사과를 먹었다.", "사과를", "사과을"),  # vowel-final: 를, not 을
    ("그는 책을 읽었다.", "책을", "책를"),  # consonant-final: 을
    ("그때 나는 학교에 갔다.", "나는", "나은"),  # 는 after a vowel
    ("우리 바다는 넓다.", "바다는", "바다은"),
    ("여기 물이 있다.", "물이", "물가"),  # 이 after a consonant
    ("그때 우리가 왔다.", "우리가", "우리이"),  # 가 after a vowel
    ("그는 서울로 갔다.", "서울로", "서울으로"),  # 로 after final ㄹ, not 으로
    ("그는 길로 갔다.", "길로", "길으로"),
    ("그는 집으로 갔다.", "집으로", "집로"),  # 으로 after another final consonant
    ("그는 차로 갔다.", "차로", "차으로"),  # 로 after a vowel
    ("그는 책과 물을 샀다.", "책과", "책와"),
    ("그는 사과와 책을 샀다.", "사과와", "사과과"),
])
def test_korean_particles_swap_to_the_wrong_allomorph(sentence, good, bad):
    assert (good, bad) in ko_pairs(sentence)


def test_korean_verb_endings_and_wrong_originals_make_no_pair():
    # 하는, 가는, 먹을: verb stems (never seen with 의/에), not a noun and its particle
    for sentence in ("책을 읽고 공부하는 사람", "그때 학교에 가는 길", "오늘 먹을 음식"):
        assert all(pair[0] not in ("공부하는", "가는", "먹을") for pair in ko_pairs(sentence))
    # the first word has no context to score it after; a wrong original is not a pair
    assert ko_pairs("사과를 먹었다.") == []
    assert ko_pairs("오늘 사과을 먹었다.") == []


def ja_pairs(sentence: str) -> list:
    """Every pair the Japanese rule makes in sentence."""
    return [pair for candidates in probes.japanese_particles([sentence]) for pair in candidates]


def test_japanese_particles_are_spelled_as_read_only_where_they_are_particles():
    sents = ["私は学校へ行きます。", "東京には多くの人がいる。", "彼は本を読んだ。",
             "はなが咲いている庭です。", "へやの中で本を読む。"]
    made = {(p.context[-2:], p.good[0], p.bad[0]) for s in sents
            for p in ja_pairs(s)}
    for pair in made:
        assert pair[1:] in {("を", "お"), ("は", "わ"), ("へ", "え")}
    # はな (flower) and へや (room) start their sentences and words: never touched
    assert ja_pairs("はなが咲いている庭です。") == []
    assert [(p.good[0], p.bad[0]) for p in ja_pairs("へやの中で本を読む。")] == [("を", "お")]
    seen = {p.good[0] for s in ("私は学校へ行きます。", "東京には多くの人がいる。")
            for p in ja_pairs(s)}
    assert seen == {"は", "へ"}


def test_vietnamese_tone_swaps_give_another_syllable_with_the_same_letters():
    sents = ["Tôi đi học ở trường mỗi ngày.", "Người Việt Nam rất thích ăn phở."] * 5
    pairs = [pair for candidates in probes.vietnamese_tones(sents) for pair in candidates]
    assert len(pairs) > 20
    for p in pairs:
        good, bad = p.good.split()[0], p.bad.split()[0]
        assert good != bad
        strip = "".join(c for c in unicodedata.normalize("NFD", good) if c not in probes.VI_TONES)
        assert strip == "".join(c for c in unicodedata.normalize("NFD", bad)
                                if c not in probes.VI_TONES)  # only the tone differs
        assert unicodedata.is_normalized("NFC", bad)
    assert probes.with_tone("liệu", "\u0300") == "liều"  # the dot below gives way to the grave
    assert probes.with_tone("người", "") == "ngươi"


@pytest.mark.parametrize("lang", ["ko", "ja", "vi", "en"])
def test_pairs_differ_only_at_the_change_and_keep_the_held_out_text(lang):
    texts = list(data.iter_texts([data.BUNDLED[f"{lang}_eval"]]))
    made = make_probes(lang, texts)
    sents = probes.sentences(texts)
    for name, pairs in made.items():
        assert 500 <= len(pairs) <= probes.MAX_PAIRS, (name, len(pairs))
        for p in pairs[:200]:
            assert p.context and p.good != p.bad
            assert any(p.context + p.good in s for s in sents), (name, p)  # held-out, unchanged
            assert sorted(p.good) == sorted(p.bad) or name.endswith(("particles", "tones"))
        assert make_probes(lang, texts) == made  # the same pairs every time


def test_probe_loglikelihoods_equal_a_hand_computation(tiny_model, base_tok):
    """Each continuation's summed log-probability, split as lm-evaluation-harness splits it,
    equals the one computed token by token from the full logits; a tie is the original's win
    where it is listed first."""
    pairs = [Pair("The cat sat", " on the mat.", " mat the on."),
             Pair("대한민국의 수도는", " 서울이다.", " 서울가다."), Pair("x", " y", " y"),
             Pair("The dog sat", " on the rug.", " rug the on."),  # a batch of two
             Pair("東京には多くの人", "がいる。", "わいる。"),  # no space at the boundary
             Pair("Welcome to LibreO", "ffice help.", "ffice halp.")]  # "Office" spans it
    lls = probe_loglikelihoods(tiny_model, base_tok, pairs, "cpu", torch.autocast("cpu",
                               enabled=False), batch_size=2)
    for pair, got in zip(pairs, lls):
        context = base_tok.encode(pair.context).ids
        for continuation, ll in zip((pair.good, pair.bad), got):
            # the harness's sequence: the context's tokens, then what follows as many tokens
            # of the whole; one full forward pass, no cache
            ids = context + base_tok.encode(pair.context + continuation).ids[len(context):]
            logp = tiny_model(torch.tensor([ids[:-1]])).log_softmax(-1)[0]
            expected = sum(logp[t - 1, ids[t]].item() for t in range(len(context), len(ids)))
            assert abs(ll - expected) < 1e-4
    assert lls[2][0] == lls[2][1]
    acc = probe_accuracy(lls, pairs)
    wins = sum(g > b or (g == b and p.good_first) for (g, b), p in zip(lls, pairs))
    assert acc["n"] == 6 and acc["acc"] == wins / 6


def test_pairs_with_as_many_tokens_a_side_leave_a_random_model_at_chance(tiny_model, base_tok):
    """A random model prefers whichever side has fewer tokens (each token costs about log V);
    the pairs keep=same_length(tok) draws have none, and the random model is at chance."""
    texts = list(data.iter_texts([data.BUNDLED["vi_eval"]]))  # tone marks: uneven in bytes

    def count(text: str) -> int:
        return len(base_tok.encode(text, add_special_tokens=False).ids)
    every = make_probes("vi", texts, max_pairs=500)["vi_tones"]
    uneven = [p for p in every if count(p.context + p.good) != count(p.context + p.bad)]
    fair = make_probes("vi", texts, max_pairs=500, keep=probes.same_length(base_tok))["vi_tones"]
    assert len(fair) == 500 and len(uneven) >= 150
    assert all(count(p.context + p.good) == count(p.context + p.bad) for p in fair)
    off = torch.autocast("cpu", enabled=False)
    lls = probe_loglikelihoods(tiny_model, base_tok, uneven, "cpu", off)
    shorter_wins = sum((good > bad) == (count(p.context + p.good) < count(p.context + p.bad))
                       for (good, bad), p in zip(lls, uneven))
    assert shorter_wins / len(uneven) > 0.9
    acc = probe_accuracy(probe_loglikelihoods(tiny_model, base_tok, fair, "cpu", off), fair)
    assert abs(acc["acc"] - 0.5) < 3 * (0.25 / len(fair)) ** 0.5, acc  # within 3 sigma of 50%


def test_a_tie_goes_to_the_original_in_half_of_the_pairs():
    """A model that gives both sides one score (mean init: one row for every new token) scores
    what a coin would: ties go to the choice listed first, the original in half of the pairs."""
    pairs = make_probes("en", list(data.iter_texts([data.BUNDLED["en_eval"]])))["en_word_order"]
    first = sum(p.good_first for p in pairs) / len(pairs)
    assert abs(first - 0.5) < 0.05
    acc = probe_accuracy([(-3.0, -3.0)] * len(pairs), pairs)
    assert acc["acc"] == acc["acc_norm"] == first
    assert probe_accuracy([(-1.0, -2.0), (-2.0, -1.0)], pairs[:2])["acc"] == 0.5


def test_same_length_refuses_a_token_across_the_context_s_end():
    """A merge that spans the end of the context (Japanese writes no space there) would make the
    harness score a continuation that is not the text's: such pairs are not kept."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    tok = Tokenizer(BPE({"a": 0, "b": 1, "c": 2, "ab": 3}, [("a", "b")]))
    keep = probes.same_length(tok)
    assert not keep(Pair("ca", "bc", "bb"))  # c ab c and c ab b: "ab" spans the context's end
    assert keep(Pair("cc", "ac", "bc"))  # c c|a c and c c|b c
    assert not keep(Pair("cc", "ab", "ba"))  # c c|ab against c c|b a: 1 token against 2
