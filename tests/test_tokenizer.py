"""tokenizer.py: the merged tokenizer against the base tokenizer, tokenizers' BPE, transformers."""
import json
import unicodedata

import pytest
from helpers import ENGLISH, KOREAN, ROOT

import data
import tokenizer as T

NEW = T.REFERENCE_NEW_TOKENS


def hangul(raw: bytes) -> bool:
    return T.holds_script(raw, "hangul")


def non_korean_lines() -> list:
    """A few hundred varied lines with no Hangul: prose, code, numbers, emoji, other scripts."""
    prose = [line for doc in data.iter_texts([data.BUNDLED["en_eval"]])
             for line in doc.split("\n") if line.strip()][:200]
    code = [line for line in (ROOT / "model.py").read_text().split("\n") if line.strip()][:150]
    other = ["3.14159 + 2,718 = 5.85959; 1e-5 0x1F 2026-11-28 12:30:45", "$1,234,567.89 (+12%)",
             "emoji 🙂🚀👍🏽👨‍👩‍👧 ❤️ ✅", "日本語の文章と中文句子。", "Съешь же ещё этих мягких булок",
             "naïve café façade Ærøskøbing", "مرحبا بالعالم", "नमस्ते दुनिया", "ｆｕｌｌ　ｗｉｄｔｈ",
             "tabs\tand  double  spaces\n\n\nnewlines", "<|im_start|>user\nhi<|im_end|>",
             "ꀀꀁ Yi syllables ꓐꓑ Lisu", "Ѐ Ё Ђ Ѓ Є", "\u3000\u3001\u3002 「引用」", "🇰🇷 🇺🇸"]
    return prose + code + other + ENGLISH


def test_text_without_hangul_tokenizes_exactly_as_before(merged, base_tok):
    lines = non_korean_lines()
    assert len(lines) > 300
    for line in lines:
        assert merged.encode(line).ids == base_tok.encode(line).ids, line


def test_korean_round_trips(merged):
    all_syllables = "".join(chr(c) for c in range(0xAC00, 0xD7A4))
    samples = KOREAN + list(data.iter_texts([data.BUNDLED["ko_eval"]])) + [
        all_syllables, "똠방각하 뷁 햏 쀍 갂 퓛", "ㅋㅋㅋ ㅠㅠ ㄱㄴㄷ ᄀᄁᄂ ᅡᅢ ᆨᆩ ꥠ ힰ",
        unicodedata.normalize("NFD", "한국어 자모 분해"), "API를 3번 호출했다! (v2.0)에서", "가🙂나\t다\n"]
    for text in samples:
        assert merged.decode(merged.encode(text).ids) == text


def test_vocabulary_merges_and_reachability(merged, base_tok, emap, merged_dir):
    base_size = base_tok.get_vocab_size()
    assert merged.get_vocab_size() == base_size + NEW == 58133
    assert emap["new_tokens"] == [merged.id_to_token(base_size + i) for i in range(NEW)]
    base_json, merged_json = (json.loads(t.to_str()) for t in (base_tok, merged))
    assert merged_json["model"]["merges"][:len(base_json["model"]["merges"])] == \
        base_json["model"]["merges"]
    assert all(merged.id_to_token(i) == base_tok.id_to_token(i) for i in range(base_size))
    vocab = merged_json["model"]["vocab"]
    for a, b in merged_json["model"]["merges"][len(base_json["model"]["merges"]):]:
        assert a in vocab and b in vocab and a + b in vocab
        assert hangul(T.token_bytes(a + b))
    for i, token in enumerate(emap["new_tokens"]):  # tokenizers' own BPE reaches every new token
        assert [t.id for t in merged.model.tokenize(token)] == [base_size + i], token
    for i, name in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert merged.token_to_id(name) == i


def test_transformers_reads_the_merged_tokenizer(merged, merged_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(merged_dir)
    assert len(hf) == 58133
    for text in KOREAN + ENGLISH + ["섞인 text와 123 숫자"]:
        assert hf(text)["input_ids"] == merged.encode(text).ids


def test_eeve_map_is_the_base_encoding_of_each_token(base_tok, emap):
    for token, pieces in zip(emap["new_tokens"], emap["pieces"]):
        raw = T.token_bytes(token)
        try:  # whole characters: the base tokenizer's full pipeline on the text
            expected = base_tok.encode(raw.decode("utf-8")).ids
        except UnicodeDecodeError:  # a partial UTF-8 sequence: its BPE model on the bytes
            expected = [t.id for t in base_tok.model.tokenize(token)]
        assert pieces == expected, token


def test_python_bpe_equals_tokenizers_bpe(merged):
    merges = json.loads(merged.to_str())["model"]["merges"]
    ranks = {tuple(m): r for r, m in enumerate(merges)}
    words = [w for doc in data.iter_texts([data.BUNDLED["ko_eval"]]) for w in
             merged.pre_tokenizer.pre_tokenize_str(doc)][:3000]
    for word, _ in words:
        assert T.bpe(word, ranks) == [t.value for t in merged.model.tokenize(word)]


def test_held_out_korean_needs_three_times_fewer_tokens(merged, base_tok):
    texts = list(data.iter_texts([data.BUNDLED["ko_eval"]]))
    base_n = sum(len(e.ids) for e in base_tok.encode_batch(texts))
    merged_n = sum(len(e.ids) for e in merged.encode_batch(texts))
    assert base_n / merged_n >= 3.0, base_n / merged_n


def test_holds_hangul_cases():
    assert hangul("가".encode())
    assert hangul("가".encode()[:2])  # EA B0: only U+AC00.. starts so
    assert hangul(b"\xed")  # ED: U+D000-U+D7FF, all Hangul in valid UTF-8
    assert not hangul(b"\xea")  # EA alone may begin Yi or Vai
    assert not hangul("ꀀ".encode())  # Yi syllable, EA 80 80
    assert not hangul("가".encode()[1:])  # continuation bytes say nothing
    assert hangul("ㅋ".encode()) and not hangul("日".encode())
    assert hangul("ᄀ".encode()[:2])  # E1 84: U+1100-U+113F, all jamo


def test_other_scripts_use_the_same_rule():
    assert T.holds_script("ก".encode()[:2], "thai")  # E0 B8: U+0E00-U+0E3F
    assert not T.holds_script(b"\xe0", "thai")  # E0 alone: U+0800-U+0FFF, many scripts
    assert T.holds_script(b"\xd0", "cyrillic") and not T.holds_script(b"\xd0", "thai")
    assert T.holds_script("नमस्ते".encode(), "devanagari")


def test_training_is_deterministic(base_dir, tmp_path):
    texts = list(data.iter_texts([data.BUNDLED["ko_train"]]))[:150]
    for out in ("a", "b"):
        T.build(base_dir, tmp_path / out, iter(texts), 300)
    for name in ("tokenizer.json", "eeve_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_too_little_korean_is_a_clear_error(base_dir, tmp_path):
    with pytest.raises(ValueError, match="yields only .* new hangul tokens"):
        T.build(base_dir, tmp_path, iter(["한국어 문장 하나뿐."]), 500)
