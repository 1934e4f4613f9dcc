"""The first hour of a new user: --help, fast failures without the hub, logs that survive a
notebook, TensorBoard and W&B offline, presets at any process count, a text field per source,
and the outputs a user shares."""
import dataclasses
import json
import re
import subprocess
import sys
import time

import pytest
from helpers import ENV, ROOT, command, free_port, tiny_flags

import bori
import config
import data
import final
from gguf_io import read_gguf, write_gguf


def test_help_lists_every_config_field_with_its_default_and_comment(capsys):
    assert bori.main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  --(\w+)=", out, flags=re.M)
    assert listed == [f.name for f in dataclasses.fields(bori.Config)]
    assert re.search(r"^  --eval_bytes=200000 +UTF-8 bytes of held-out text per language$", out,
                     flags=re.M)
    assert "presets (--preset=NAME): bori, demo" in out and "\nhardware\n" in out


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


@pytest.mark.slow
def test_a_log_that_is_not_a_terminal_gets_plain_lines(tmp_path, tiny_base):
    out = tmp_path / "run"
    run = subprocess.run(command(out, tiny_base, 1, log_every=2), env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = re.findall(r"^phase 1b step (\d+)/6 \| loss [\d.]+ \| bits/byte ~[\d.]+ \| lr "
                       r"[\d.e+-]+ \| tok/s [\d,]+ \| phase time \d\d:\d\d:\d\d \| eta "
                       r"\d\d:\d\d:\d\d \(the whole run\)$", run.stderr, flags=re.M)
    assert lines == ["2", "4", "6"], run.stderr[-2000:]
    assert "\r" not in run.stderr and "mfu" not in run.stderr  # no bar; no MFU on a CPU
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(abs(r["time"] - time.time()) < 600 for r in records)
    assert not any("mfu" in r for r in records)


@pytest.mark.slow
def test_tensorboard_and_wandb_offline_get_every_number(tmp_path, tiny_base, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for sink in ("tensorboard", "wandb"):
        assert bori.main(tiny_flags(tmp_path / sink, tiny_base, report_to=sink)) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard" / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 13))  # Phase 1B after Phase 1A's 6 steps
    train = [json.loads(line) for line in open(tmp_path / "tensorboard" / "metrics.jsonl")]
    train = [r["loss"] for r in train if r["kind"] == "train"]
    assert [e.value for e in losses] == pytest.approx(train)
    assert "eval/ko_bpb" in events.Tags()["scalars"]
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 1000


@pytest.mark.slow
def test_the_demo_preset_runs_on_two_processes_as_it_is(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", str(ROOT / "bori.py"), "--preset=demo",
         f"--out_dir={out}", "--steps_1a=2", "--warmup_1a=1", "--decay_1a=1", "--steps_1b=2",
         "--warmup_1b=1", "--decay_1b=1", "--eval_bytes=1500", "--sample_tokens=4"],
        env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    said = run.stdout + run.stderr
    assert said.count("does not divide batch_tokens=512 over 2 processes; using "
                      "micro_batch=1") == 1
    assert said.count("phase 1a step 0: ") == 1 and said.count("Korean bits/byte") == 1
    assert json.loads((out / "config.json").read_text())["grad_accum"] == 1


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

# ----------------------------------------------------------------------------------------------
# What a user shares


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


def test_gguf_q8_0_export_is_named_after_the_run_and_close_to_f16(tiny_run, tmp_path):
    f16, q8 = tmp_path / "f16.gguf", tmp_path / "q8.gguf"
    write_gguf(tiny_run / "final", f16, "f16", "bori-test")
    write_gguf(tiny_run / "final", q8, "q8_0", "bori-test")
    _, a, meta = read_gguf(f16)
    _, b, _ = read_gguf(q8)
    assert meta["general.name"] == "bori-test"
    from gguf import GGUFReader

    def matrix_bytes(path):
        return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if len(t.shape) == 2)
    assert matrix_bytes(q8) / matrix_bytes(f16) == pytest.approx(34 / 64)  # 34 B per 32 weights
    for key in a:  # Q8_0: 8 bits per weight, a scale per 32: within half a step of the block max
        assert (a[key] - b[key]).abs().max() <= a[key].abs().max() / 127 + 1e-3, key
    _, run_gguf, run_meta = read_gguf(tiny_run / "final.gguf")
    assert run_meta["general.name"] == f"bori-{tiny_run.name}"


@pytest.mark.slow
def test_a_finished_run_keeps_only_what_a_user_needs(tmp_path, tiny_base):
    out = tmp_path / "run"
    assert bori.main(tiny_flags(out, tiny_base, keep_stage_models=False)) == 0
    assert not (out / "init" / "model.safetensors").exists()
    assert not (out / "phase1a" / "model").exists() and not (out / "phase1b" / "model").exists()
    assert (out / "final" / "model.safetensors").is_file() and (out / "final.gguf").is_file()
    assert json.loads((out / "phase1b" / "DONE.json").read_text())["pruned"] == ["model"]
    assert bori.main(tiny_flags(out, tiny_base, keep_stage_models=False)) == 0  # still finished


def test_warnings_a_user_needs(tmp_path, base_tok, capsys):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": f"짧은 문서 {i}"}, ensure_ascii=False) + "\n"
                            for i in range(3)))
    stream = data.PackedStream(data.Source("ko", str(path), flag="data_new"), base_tok, 0)
    stream.take(200)
    assert "warning: --data_new (" in capsys.readouterr().err  # read round again
    import prepare
    cfg = bori.Config(eval_new=str(path), eval_en=str(path))
    prepare.eval_sets(bori.sources(cfg), eval_bytes=10_000, text_field="text")
    assert re.search(r"warning: --eval_new holds only \d+ of the 10,000 bytes asked for",
                     capsys.readouterr().err)


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


def test_plan_with_an_unknown_model_is_one_sentence():
    out = subprocess.run([sys.executable, str(ROOT / "plan.py"), "--model", "foo"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "unknown model preset 'foo'; choose one of" in out.stderr
