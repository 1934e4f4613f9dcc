"""tokenizer.py: the merged tokenizer against the base tokenizer, tokenizers' BPE and
transformers; Korean, Japanese and Vietnamese."""
import json
import unicodedata

import pytest
from tokenizers import Tokenizer

import data
import tokenizer as T
from helpers import ENGLISH, KOREAN, ROOT


NEW = T.REFERENCE_NEW_TOKENS


def hangul(raw: bytes) -> bool:
    return T.holds_script(raw, "hangul")


def non_korean_lines() -> list:
    """A few hundred varied lines with no Hangul: prose, code, numbers, emoji, other scripts."""
    prose = [line for doc in data.iter_texts([data.BUNDLED["en_eval"]])
             for line in doc.split("\n") if line.strip()][:200]
    code = [line for line in (ROOT / "model.py").read_text().split("\n") if line.strip()][:150]
    other = ["3.14159 + 2,718 = 5.85959; 1e-5 0x1F 2026-11-28 12:30:45", "$1,234,567.89 (+12%)",
             "emoji 🙂🚀👍🏽👨‍👩‍👧 ❤️ ✅", "日本語の文章と中文句子。", "Съешь же ещё этих мягких булок",  # noqa: E501 (wide characters)
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
        unicodedata.normalize("NFD", "한국어 자모 분해"), "API를 3번 호출했다! (v2.0)에서", "가🙂나\t다\n"]  # noqa: E501 (wide characters)
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
    # the README's table: tokens per character 1.895 (base) and 0.364 (merged), 5.2x fewer
    chars = sum(len(t) for t in texts)
    assert (round(base_n / chars, 3), round(merged_n / chars, 3)) == (1.895, 0.364)
    assert round(base_n / merged_n, 1) == 5.2, base_n / merged_n


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


ADVERSARIAL = {
    "ja": ["ﾊﾝｶｸｶﾀｶﾅとＡＳＣＩＩ混在のテキスト123", "ｱｲｳｴｵ ﾞﾟ ｶﾞｷﾞ ｰ", "日本語とEnglishが混ざるmixed文。",  # noqa: E501 (wide characters)
           "𠮷野家の𩸽 (4-byte kanji)", "々〆〇ヶヵ・ー〜", "カ\u3099 ハ\u309a (combining voiced marks)",  # noqa: E501 (wide characters)
           unicodedata.normalize("NFD", "ガギグゲゴ パピプペポ"), "絵文字🙂🍣と\t改行\n\n終わり"],
    "vi": ["Tiếng Việt có dấu: ả ã ạ ắ ằ ẳ ẵ ặ ấ ầ ẩ ẫ ậ ẻ ẽ ẹ ế ề ể ễ ệ ỉ ĩ ị ỏ õ ọ ố ồ ổ ỗ ộ ớ ờ ở ỡ ợ",  # noqa: E501 (wide characters)
           "ĐẠI HỌC QUỐC GIA HÀ NỘI, Đường Trường Chinh", "ư ơ ă â ê ô đ Ư Ơ Ă Â Ê Ô Đ",
           unicodedata.normalize("NFD", "Người Việt Nam yêu nước thương nòi"),
           "Hòa hoà Thủy thuỷ (hai kiểu bỏ dấu)", "e\u0301 a\u0300 o\u0303 u\u0309 i\u0323 (dấu tổ hợp)",  # noqa: E501 (wide characters)
           "giá 1.234.567₫ (+12%) ngày 29/11/2026", "café naïve và phở 🍜"],
}


@pytest.fixture(scope="module", params=["ja", "vi"])
def lang(request, base_dir, tmp_path_factory):
    """The language's merge from its bundled corpus, at its preset's number of new tokens."""
    code = request.param
    out = tmp_path_factory.mktemp(f"merged_{code}")
    done = T.build(base_dir, out, data.iter_texts([data.BUNDLED[f"{code}_train"]]),
                   data.LANGUAGES[code].new_tokens, data.LANGUAGES[code].script)
    merged = Tokenizer.from_file(str(out / "tokenizer.json"))
    standalone = Tokenizer.from_file(str(out / "standalone_bpe.json"))
    held_out = list(data.iter_texts([data.BUNDLED[f"{code}_eval"]]))
    return code, merged, standalone, held_out, done, out


def holds(text: str, script: str) -> bool:
    return any(T.holds_script(ch.encode(), script) for ch in text)


def count(tok, texts) -> int:
    return sum(len(e.ids) for e in tok.encode_batch(texts))


# README, "Another language" (docs/tokenizers.txt): characters per token of the base and the
# merged tokenizer, how many times fewer tokens and the compression against a standalone BPE of
# as many tokens (100.7%, 96.4%)
README_TOKENIZER_TABLE = {"ja": (0.699, 2.637, 3.77, 1.007), "vi": (1.264, 3.509, 2.78, 0.964)}


@pytest.mark.slow
def test_compression_against_the_base_and_a_standalone_bpe(lang, base_tok):
    code, merged, standalone, held_out, done, _ = lang
    n_base, n_merged = count(base_tok, held_out), count(merged, held_out)
    assert count(standalone, held_out) / n_merged >= 0.95  # the same number of new tokens
    # the README's table: tokens per character (base, merged), x fewer, % of a standalone BPE
    chars = sum(len(t) for t in held_out)
    measured = (round(chars / n_base, 3), round(chars / n_merged, 3),
                round(n_base / n_merged, 2), round(count(standalone, held_out) / n_merged, 3))
    assert measured == README_TOKENIZER_TABLE[code], measured
    if code == "ja":
        assert n_base / n_merged >= 3.0, n_base / n_merged  # measured 3.77
        return
    # Vietnamese: a pre-token without the script's letters (plain ASCII "trong", "cho", "nhanh")
    # keeps its base tokens, or English would change; any other needs at least one token.
    words = [w for text in held_out for w, _ in base_tok.pre_tokenizer.pre_tokenize_str(text)]
    kept = [w for w in words if not T.holds_script(T.token_bytes(w), "vietnamese")]
    fewest = sum(len(base_tok.model.tokenize(w)) for w in kept) + len(words) - len(kept)
    assert n_base / fewest < 3.0  # measured 2.84: the 3x cannot be reached here
    assert round(n_base / fewest, 2) == 2.83  # the README: "at most 2.83x possible"
    assert n_base / n_merged >= 0.97 * n_base / fewest, (n_base / n_merged, n_base / fewest)


@pytest.mark.slow
def test_text_without_the_script_tokenizes_exactly_as_before(lang, base_tok):
    code, merged, *_ = lang
    script = data.LANGUAGES[code].script
    lines = [line for line in non_korean_lines() if not holds(line, script)]
    assert len(lines) > len(non_korean_lines()) - 4  # only the lines in the script are left out
    for line in lines:
        assert merged.encode(line).ids == base_tok.encode(line).ids, line


@pytest.mark.slow
def test_round_trips_and_reachability(lang, base_tok):
    code, merged, _, held_out, done, out = lang
    script = data.LANGUAGES[code].script
    for text in held_out + ADVERSARIAL[code]:
        assert merged.decode(merged.encode(text).ids) == text
    base_size = base_tok.get_vocab_size()
    new_tokens = json.loads((out / "eeve_map.json").read_text())["new_tokens"]
    assert len(new_tokens) == done["new_tokens"] == data.LANGUAGES[code].new_tokens
    for i, token in enumerate(new_tokens):
        assert [t.id for t in merged.model.tokenize(token)] == [base_size + i], token
        assert T.holds_script(T.token_bytes(token), script), token
    assert done["rule"] == f"a new token {T.SCRIPTS[script][0]}"
    assert set(done["rejected"]) >= {"not in the script", "in the base already"}
    assert done["rejected"]["not in the script"] > 0


def test_vietnamese_rule_cases():
    vi = lambda s: T.holds_script(s.encode(), "vietnamese")  # noqa: E731
    assert vi("ệ") and vi("đ") and vi("ư") and vi("à") and vi("ã")
    assert not vi("the") and not vi("ñ") and not vi("ç") and not vi("ü") and not vi("ï")
    assert not T.holds_script("ệ".encode()[:1], "vietnamese")  # E1 begins any of U+1000-1FFF
    assert not T.holds_script(b"\xc3", "vietnamese")  # C3 also begins ä ö ü ñ ç
    ja = lambda s: T.holds_script(s.encode(), "japanese")  # noqa: E731
    assert ja("の") and ja("ｶ") and ja("漢") and ja("々") and not ja("ｆ") and not ja("한")
