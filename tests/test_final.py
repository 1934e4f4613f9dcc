"""final.py: the last stage: the model card, plots, final.gguf and the summary table."""
import json
import re
import shutil

import pytest

import bori
import final
from helpers import logged


@pytest.mark.slow
def test_the_card_shows_use_hides_local_paths_and_says_what_the_base_was(tiny_run):
    card = (tiny_run / "final" / "README.md").read_text()
    assert "from transformers import AutoModelForCausalLM" in card and "llama-cli -m" in card
    assert "/tmp/" not in card and str(tiny_run) not in card
    prompt = json.loads((tiny_run / "config.json").read_text())["sample_prompts"].split("|")[0]
    assert f'tok("{prompt}", return_tensors="pt")' in card and f'-p "{prompt}" -n 40' in card
    has_template = "chat_template" in json.loads(
        (tiny_run / "final" / "tokenizer_config.json").read_text())
    assert ("was instruction-tuned, and its chat template is kept" in card) == has_template
    assert (tiny_run / "final" / "model.safetensors").stat().st_mode & 0o044 == 0o044


@pytest.mark.slow
def test_model_card_numbers_match_metrics(tiny_run):
    card = (tiny_run / "final" / "README.md").read_text()
    recs = logged(tiny_run)
    base = next(r for r in recs if r["kind"] == "eval" and r["phase"] == "base")
    last = {p: [r for r in recs if r["kind"] == "eval" and r["phase"] == p][-1]
            for p in ("1a", "1b")}
    row = re.search(r"\| Korean \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", card).groups()
    assert [float(v) for v in row] == [round(base["ko_bpb"], 4), round(last["1a"]["ko_bpb"], 4),
                                       round(last["1b"]["ko_bpb"], 4)]
    row = re.search(r"\| English \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", card).groups()
    assert float(row[2]) == round(last["1b"]["en_bpb"], 4)
    train_1b = [r for r in recs if r["kind"] == "train" and r["phase"] == "1b"]
    assert f"| {len(train_1b)} | {train_1b[-1]['tokens']:,} |" in card
    assert "license: apache-2.0" in card and "## Use" in card  # the template: test_ux
    report = json.loads((tiny_run / "tokenizer" / "report.json").read_text())
    assert f"{report['ko']['merged']['chars_per_token']:.3f} characters per token" in card


@pytest.mark.slow
def test_the_card_of_a_base_without_tokenizer_config_says_it_is_a_base_model(tiny_run,
                                                                              tmp_path):
    """tokenizer_config.json is optional in a Hugging Face folder: without it the card is
    still written (the base is then taken as a plain base model), not an error at the end."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "final" / "tokenizer_config.json").unlink()
    card = final.model_card(run)
    assert "is a base model and so is this one: it continues text (no chat template)" in card


@pytest.mark.slow
def test_run_leaves_plots_and_gguf(tiny_run):
    png = tiny_run / "plots" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert (tiny_run / "final.gguf").stat().st_size > 1_000_000


def test_the_summary_flags_a_language_that_got_worse(tmp_path, capsys):
    phases = [{"name": p.name, "folder": p.folder} for p in bori.recipe(bori.Config())]
    (tmp_path / "config.json").write_text(json.dumps({"lang": "ko", "phases": phases}))
    for stage, done in [("tokenizer", {}), ("init", {"base_bpb": {"ko_bpb": 2.0, "en_bpb": 1.0}}),
                        ("phase1b", {"ko_bpb": 1.5, "en_bpb": 1.1})]:
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "DONE.json").write_text(json.dumps(done))
    final.summary(tmp_path)
    out = capsys.readouterr().out
    assert re.search(r"English bits/byte +1\.000 +1\.100  \+10\.0%, worse than the base", out)
    assert re.search(r"Korean bits/byte +2\.000 +1\.500$", out, flags=re.M)
    assert "model:" not in out  # no final/ here: the summary names only what exists
