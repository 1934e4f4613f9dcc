"""inputs.py: the base model and the data sources checked before any stage; the converted-GGUF
cache."""
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bori
import data
import inputs
from gguf_io import write_gguf
from helpers import ROOT, tiny_flags, weights
from inputs import resolve_base


def test_an_unreachable_hub_source_is_one_sentence_within_seconds(tmp_path, tiny_base,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a dead network
    t0 = time.time()
    code = bori.main(tiny_flags(tmp_path / "run", tiny_base,
                                data_en="hf:HuggingFaceTB/smollm-corpus:fineweb-edu-dedup"))
    assert code == 2 and time.time() - t0 < 10
    err = capsys.readouterr().err
    assert re.search(r"^error: --data_en: could not reach 'hf:HuggingFaceTB/smollm-corpus:"
                     r"fineweb-edu-dedup' on the Hugging Face hub \(.*\); offline, run "
                     r"--preset=demo, or point --data_new", err, flags=re.M), err
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_text_field_per_source(tmp_path, tiny_base, capsys):
    ko = tmp_path / "ko.jsonl"
    ko.write_text("".join(json.dumps({"content": "한국어 문서 " * 50}, ensure_ascii=False) + "\n"
                          for _ in range(40)))
    assert bori.main(tiny_flags(tmp_path / "a", tiny_base, data_ko=ko)) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: --data_new: .*ko.jsonl line 1 has no text field 'text' \(it has "
                     r"\['content'\]\); name the key that holds the text after the path, e.g. "
                     r"\S*ko.jsonl#content", err), err
    assert not (tmp_path / "a" / "config.json").exists()
    source = data.Source("ko", f"{ko}#content")
    assert (source.path, source.text_field) == (str(ko), "content")
    assert next(data.iter_texts([f"{ko}#content"])).startswith("한국어 문서")


@pytest.mark.slow
def test_gguf_cache_is_keyed_by_content_and_shared_safely(tiny_run, tmp_path):
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    a.parent.mkdir(), b.parent.mkdir()
    write_gguf(tiny_run / "final", a, "f32")
    write_gguf(tiny_run / "final", b, "f16")
    cache = tmp_path / "cache"
    folder_a, folder_b = resolve_base(str(a), cache), resolve_base(str(b), cache)
    assert folder_a != folder_b  # the same name, other content: two conversions
    embed = "model.embed_tokens.weight"  # f16 rounds it: the two are really different files
    assert not torch.equal(weights(folder_a)[embed], weights(folder_b)[embed])
    shutil.copy(b, a)  # replaced in place: converted anew
    assert resolve_base(str(a), cache) == folder_b
    # two first-time conversions at once: both succeed, one folder stands, whole
    c = tmp_path / "c.gguf"
    write_gguf(tiny_run / "final", c, "f32")
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from inputs import "
              f"resolve_base; print(resolve_base({str(c)!r}, {str(cache)!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    folder = Path(outs[0][0].strip())
    assert torch.equal(weights(folder)["model.norm.weight"],
                       weights(tiny_run / "final")["model.norm.weight"])
    assert not list(cache.glob("*.tmp")) and len(list(cache.iterdir())) == 3


def test_the_hub_check_names_a_missing_config_or_split_and_sends_the_token(monkeypatch):
    """A hub of our own on 127.0.0.1 answers as the Hugging Face API does: a dataset's card lists
    its configs and their splits. A config typo (kor_hang) and an unknown split are one
    sentence each before any stage; the user's token goes along with every request."""
    import http.server
    import threading
    card = {"cardData": {"configs": [
        {"config_name": "kor_Hang", "data_files": [{"split": "train", "path": "a/*"},
                                                   {"split": "test", "path": "b/*"}]},
        {"config_name": "jpn_Jpan", "data_files": [{"split": "train", "path": "c/*"}]}]}}
    seen = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            body = json.dumps(card).encode() if self.path == "/api/datasets/org/fw2" else b""
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body)
        do_HEAD = do_GET

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        inputs.check_hub({"data_new": "hf:org/fw2:kor_Hang:train",
                          "eval_new": "hf:org/fw2:kor_Hang:test"})  # both there: no error
        assert seen and all(auth == "Bearer hf_secret" for _, auth in seen)
        with pytest.raises(ValueError, match=r"--data_new: 'hf:org/fw2:kor_hang:train' on the "
                           r"Hugging Face hub: it has no config 'kor_hang'; it has \['jpn_Jpan',"
                           r" 'kor_Hang'\]; name them as hf:NAME:CONFIG:SPLIT"):
            inputs.check_hub({"data_new": "hf:org/fw2:kor_hang:train"})
        with pytest.raises(ValueError, match=r"its config 'jpn_Jpan' has no split 'test'; it "
                           r"has \['train'\]"):
            inputs.check_hub({"eval_new": "hf:org/fw2:jpn_Jpan:test"})
        with pytest.raises(FileNotFoundError, match=r"--data_en: could not reach "
                           r"'hf:org/none' on the Hugging Face hub \(HTTP 404\)"):
            inputs.check_hub({"data_en": "hf:org/none"})
    finally:
        server.shutdown()


def test_a_hub_base_is_checked_from_its_config_before_its_weights_are_fetched(
        monkeypatch, tmp_path, base_dir):
    """A hub base of another architecture (gpt2's config) is refused from its JSON files: the
    weights are never asked for. A Llama base is checked the same way, then fetched whole."""
    import huggingface_hub
    asked = []

    def snapshot_download(repo_id, allow_patterns):  # the hub, from a local folder
        asked.append(allow_patterns)
        return str(tmp_path / repo_id)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    gpt2, llama = tmp_path / "openai" / "gpt2", tmp_path / "org" / "llama"
    for folder in (gpt2, llama):
        shutil.copytree(base_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"the base model in .*openai/gpt2 is a 'gpt2' model; "
                       r"bori trains the Llama architecture"):
        resolve_base("openai/gpt2", seq_len=512)
    assert asked == [["*.json"]]  # the config alone: no weights downloaded for nothing
    asked.clear()
    assert resolve_base("org/llama", seq_len=512) == llama
    assert asked == [["*.json"], ["*.json", "*.safetensors", "tokenizer*", "*.txt"]]
