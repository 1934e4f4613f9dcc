"""config.py: flags, presets and TOML into Config, --help, and every value that cannot work
refused in one sentence (exit code 2, no traceback)."""
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bori
import config
import data
from helpers import ENV, ROOT, tiny_flags


def test_help_lists_every_config_field_with_its_default_and_comment(capsys):
    assert bori.main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  --(\w+)=", out, flags=re.M)
    assert listed == [f.name for f in dataclasses.fields(bori.Config)]
    assert re.search(r"^  --eval_bytes=200000 +UTF-8 bytes of held-out text per language$", out,
                     flags=re.M)
    assert "presets (--preset=NAME): bori, demo" in out and "\nhardware\n" in out


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench.py", "plan.py", "sample.py", "export_gguf.py",
                                    "report.py"])
def test_every_tool_has_help_for_every_flag(script):
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    options = re.split(r"\n  (?=-)", out.stdout.split("options:")[1])[1:]  # one block each
    assert options and all(len(o.split(None, 2)) > 2 or o.startswith("-h") for o in options), \
        out.stdout  # each option: its name, its argument, and words of help
    assert "--seq " not in out.stdout and "--peak-tflops" not in out.stdout  # bori's names


def test_key_value_as_two_arguments_and_a_preset_in_toml(tmp_path):
    cfg = config.load_config(bori.Config, bori.PRESETS, ["--preset", "demo", "--seq_len", "64",
                                                         "--compile", "true"])
    assert (cfg.out_dir, cfg.seq_len, cfg.compile) == ("runs/demo", 64, True)
    (tmp_path / "run.toml").write_text('preset = "demo"\nsteps_1a = 7\n')
    cfg = config.load_config(bori.Config, bori.PRESETS, [f"--config={tmp_path / 'run.toml'}"])
    assert (cfg.out_dir, cfg.steps_1a) == ("runs/demo", 7)
    cfg = config.load_config(bori.Config, bori.PRESETS, [f"--config={tmp_path / 'run.toml'}",
                                                         "--preset=bori"])
    assert (cfg.out_dir, cfg.steps_1a) == ("runs/bori", 7)  # the command line's preset wins


def test_every_language_preset_is_one_recipe_with_its_own_values():
    import bori
    from config import load_config, validate
    load = lambda *argv: load_config(bori.Config, bori.PRESETS, list(argv), bori.RENAMED)  # noqa
    for code, lang in data.LANGUAGES.items():
        for kind in ("bori", "demo"):
            cfg = load(f"--preset={kind}-{code}")
            validate(cfg, bori.recipe(cfg), bori.sources(cfg), 1)
            assert (cfg.lang, cfg.unicode_script, cfg.new_tokens) == (code, lang.script,
                                                                     lang.new_tokens)
            assert (cfg.mix_1a, cfg.mix_1b) == (f"{code}=1.0", f"{code}=0.9,en=0.1")
            if kind == "bori":
                assert cfg.data_new == f"hf:HuggingFaceFW/fineweb-2:{lang.fineweb2}:train"
            else:
                assert cfg.data_new == data.BUNDLED[f"{code}_train"]
    # Korean's presets are the seed's recipe and demo as they were; old flag names still work
    strip = lambda cfg: {**vars(cfg), "out_dir": ""}  # noqa: E731
    assert strip(load("--preset=bori-ko")) == strip(load("--preset=bori"))
    assert strip(load("--preset=demo-ko")) == strip(load("--preset=demo"))
    old = load("--preset=demo-vi", "--data_ko=a.txt", "--eval_ko=b.txt", "--script=hangul")
    assert (old.data_new, old.eval_new, old.unicode_script) == ("a.txt", "b.txt", "hangul")
    cfg = load("--preset=demo", "--lang=ja")  # Korean's mixes with Japanese named: one sentence
    with pytest.raises(ValueError, match=r"names \['ko'\]; the sources are \['en', 'ja'\] "
                       r"\(--lang=ja names the new language's; --preset=demo-ja or bori-ja"):
        validate(cfg, bori.recipe(cfg), bori.sources(cfg), 1)


def broken_base(tmp_path, tiny_base, what: str) -> Path:

    from safetensors.torch import load_file, save_file
    folder = tmp_path / f"base_{what}"
    shutil.copytree(tiny_base, folder)
    state = load_file(folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    if what == "no_config":
        (folder / "config.json").unlink()
    elif what == "missing_tensor":
        del state["model.layers.0.self_attn.q_proj.weight"]
    elif what == "wrong_shape":
        state["model.norm.weight"] = torch.ones(7)
    elif what == "small_vocab":  # a model with fewer rows than its tokenizer has tokens
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:1000]
        (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1000}))
    elif what == "gpt2":  # another architecture, whose config names other fields
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    elif what == "other_tokenizer":  # Llama 3 calls its separator <|end_of_text|>
        tok = folder / "tokenizer.json"
        tok.write_text(tok.read_text().replace("<|endoftext|>", "<|end_of_text|>"))
    save_file(state, folder / "model.safetensors")
    return folder


def flags(**overrides):
    return lambda tmp_path, base: tiny_flags(tmp_path / "out", base, **overrides)


def extra(*args):
    return lambda tmp_path, base: [*tiny_flags(tmp_path / "out", base), *args]


def corpus(content: str):
    def build(tmp_path, base):
        (tmp_path / "corpus.jsonl").write_text(content)
        return tiny_flags(tmp_path / "out", base, data_ko=tmp_path / "corpus.jsonl")
    return build


def corpus_bytes(content: bytes):
    def build(tmp_path, base):
        (tmp_path / "corpus.txt").write_bytes(content)
        return tiny_flags(tmp_path / "out", base, data_ko=tmp_path / "corpus.txt")
    return build


def file_as_out_dir(tmp_path, base):
    (tmp_path / "afile").write_text("not a folder")
    return tiny_flags(tmp_path / "afile", base)


def out_dir_in_data(tmp_path, base):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "ko.jsonl").write_text('{"text": "한국어 문서"}\n')
    return tiny_flags(tmp_path / "corpus" / "out", base, data_ko=tmp_path / "corpus")


def english_parquet_without_text(tmp_path, base):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["An English document."] * 4}), tmp_path / "en.parquet")
    return tiny_flags(tmp_path / "out", base, data_en=tmp_path / "en.parquet")


def english_all_held_out(tmp_path, base):
    (tmp_path / "en.jsonl").write_text('{"text": "The only English document."}\n')
    return tiny_flags(tmp_path / "out", base, data_en=tmp_path / "en.jsonl",
                      eval_en=tmp_path / "." / "en.jsonl")


def toml(content: str):
    def build(tmp_path, base):
        (tmp_path / "run.toml").write_text(content)
        return [*tiny_flags(tmp_path / "out", base), f"--config={tmp_path / 'run.toml'}"]
    return build


def base_with(what: str):
    return lambda tmp_path, base: tiny_flags(tmp_path / "out", broken_base(tmp_path, base, what))


BAD_INPUTS = {  # name: (argv builder, the sentence expected)
    "missing base": (flags(base="/no/such/base"), r"base model '/no/such/base' is neither"),
    "unreachable hub base": (flags(base="nobody-here/no-such-model"),
                             r"--base: could not reach 'nobody-here/no-such-model' on the Hugging"),
    "no config.json": (base_with("no_config"), r"lacks config.json or tokenizer.json"),
    "missing tensor": (base_with("missing_tensor"),
                       r"lacks tensor 'model.layers.0.self_attn.q_proj"),
    "wrong shape": (base_with("wrong_shape"), r"tensor 'model.norm.weight' has shape \(7,\)"),
    "tokenizer vs model": (base_with("small_vocab"),
                           r"tokenizer.json has 49152 tokens but the model only"),
    "other tokenizer": (base_with("other_tokenizer"),
                        r"is not a byte-level BPE with <\|endoftext\|>"),
    "missing corpus": (flags(data_ko="/no/such/*.jsonl"), r"matches no files"),
    "empty corpus": (corpus(""), r"--data_new: .*corpus.jsonl holds no text \(only blank lines"),
    "no text field": (corpus('{"body": "한국어"}\n'),
                      r"line 1 has no text field 'text' \(it has \['body'\]\)"),
    "unknown preset": (extra("--preset=huge"), r"unknown preset 'huge'; choose one of"),
    "unknown key": (extra("--seq_lenn=5"), r"unknown option --seq_lenn; did you mean --seq_len\?"),
    "wrong type": (extra("--micro_batch=two"), r"--micro_batch=two: expected int"),
    "bad boolean": (extra("--compile=yes"), r"--compile=yes: expected true or false"),
    "seq_len too long": (flags(seq_len=1024, batch_tokens=2048),
                         r"seq_len=1024 exceeds the base model's 512 positions"),
    "bad batch": (flags(batch_tokens=100), r"batch_tokens=100 is not a multiple of 64"),
    "no batch": (flags(batch_tokens=0),
                 r"batch_tokens=0 is less than one micro-batch on each process 64 .*; try "
                 r"batch_tokens=64"),
    "unknown init": (flags(init="distil"), r"init must be eeve, distill, mean or random"),
    "no distillation steps": (flags(init="distill", distill_steps=0),
                              r"distill_contexts, distill_before and distill_steps must be > 0"),
    "infinite distillation lr": (flags(init="distill", distill_lr="inf"),
                                 r"distill_lr must be finite and > 0"),
    "negative embedding decay": (flags(embed_weight_decay=-0.1),
                                 r"embed_weight_decay must be finite and >= 0"),
    "out_dir inside the data": (out_dir_in_data,
                                r"out_dir=.*corpus/out is inside --data_new=.*corpus, whose files "
                                r"are read as text"),
    "a language's data flag": (extra("--data_ja=ja.jsonl"),
                               r"unknown option --data_ja; did you mean --data_new\? \(the new "
                               r"language's text; --lang=ja"),
    "English parquet without its text column": (
        english_parquet_without_text,
        r"--data_en: .*en.parquet has no text column 'text' \(it has \['content'\]\)"),
    "another architecture": (base_with("gpt2"), r"is a 'gpt2' model; bori trains the Llama "
                                                r"architecture"),
    "English all held out": (english_all_held_out,
                             r"--data_en: all of the text of .*en.jsonl is held out for "
                             r"evaluation \(--eval_en reads it too\)"),
    "TOML typo": (toml("seq_lenn = 5\n"), r"unknown key 'seq_lenn' in .*; did you mean seq_len\?"),
    "zero weight": (flags(mix_1b="ko=0.9,en=0"), r"every source needs a weight > 0"),
    "config file key": (toml("lr = 0.1\n"), r"unknown key 'lr' in"),
    "infinite lr": (flags(lr_1a="inf"), r"learning rates must be finite and > 0"),
    "zero lr": (flags(lr_1b=0), r"learning rates must be finite and > 0"),
    "zero grad_clip": (flags(grad_clip=0), r"grad_clip must be finite and > 0"),
    "beta2 of 1": (flags(beta2=1.0), r"beta1 and beta2 must be in \[0, 1\)"),
    "zero peak_tflops": (flags(peak_tflops=0), r"peak_tflops must be > 0"),
    "negative max_hours": (flags(max_hours=-1), r"max_hours and stop_after_steps must be >= 0"),
    "negative stop_after_steps": (flags(stop_after_steps=-2), r"must be >= 0 \(0: no limit\)"),
    "no seq_len": (flags(seq_len=0), r"seq_len must be >= 1 and micro_batch >= 0"),
    "empty out_dir": (extra("--out_dir="), r"out_dir must name a folder"),
    "unknown source in mix": (flags(mix_1b="ko=0.9,fr=0.1"),
                              r"mix_1b='ko=0.9,fr=0.1' names \['fr'\]; the sources are"),
    "TOML number for a boolean": (toml("compile = 1\n"), r"compile = 1 in .*: expected bool"),
    "TOML boolean for a number": (toml("seq_len = true\n"), r"seq_len = True in .*: expected int"),
    "broken TOML": (toml("seq_len = \n"), r"run.toml is not valid TOML \(.*\); fix it"),
    "a source named twice": (flags(mix_1b="ko=0.5,ko=0.5"), r"names 'ko' twice"),
    "out_dir is a file": (file_as_out_dir, r"out_dir=.*afile is a file, not a folder"),
    "CP949 corpus": (corpus_bytes("한국어 문서입니다. 둘째 문장입니다.".encode("cp949") * 40),
                     r"--data_new: .* is not UTF-8 text \(most of its first bytes are not UTF-8"),
    "Latin-1 French as Korean": (corpus_bytes("Le café de la gare était fermé.\n\n".encode(
        "latin-1") * 40), r"--data_new: only 0.0% of its first [\d,]+ letters are hangul: is it "
                         r"Korean text, in UTF-8\?"),
    "Korean as English": (flags(data_en=data.BUNDLED["ko_train"]),
                          r"--data_en: only 1\d\.\d% of its first .* letters are latin: is it "
                          r"English text, in UTF-8\?"),
    "eval flags swapped": (flags(eval_ko=data.BUNDLED["en_eval"], eval_en=data.BUNDLED["ko_eval"]),
                           r"--eval_new: only 0.0% of its first .* letters are hangul"),
}


REFUSED_BEFORE_WRITING = [k for k in BAD_INPUTS if k not in (
    "missing tensor", "wrong shape",  # found when the init stage loads the weights
    "no text field", "missing base", "English all held out", "Korean as English",
    "Latin-1 French as Korean", "eval flags swapped")]  # read once the run holds out_dir


# these two build the tokenizer stage before the init stage finds the broken weights: slow
SLOW_CASES = ("missing tensor", "wrong shape")


@pytest.mark.parametrize("case", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_CASES
                                  else k for k in BAD_INPUTS])
def test_bad_input_is_one_clear_sentence(case, tmp_path, tiny_base, capsys):
    build, message = BAD_INPUTS[case]
    code = bori.main(build(tmp_path, tiny_base))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(message, lines[0]), lines[0]
    if case in REFUSED_BEFORE_WRITING:  # checked before anything was written
        assert not (tmp_path / "out" / "config.json").exists()
        assert not (tmp_path / "corpus" / "out").exists()


def test_out_dir_with_a_tilde_is_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config.load_config(bori.Config, bori.PRESETS, ["--out_dir=~/runs/x"], bori.RENAMED)
    assert cfg.out_dir == str(tmp_path / "runs" / "x")
