"""A run's inputs, found and checked before any stage: the base model (found, converted from
GGUF if need be, its tokenizer checked) and every data source (local files readable, hub
datasets reachable), so that a wrong path costs seconds, not a tokenizer stage.

A base is the offline SmolLM2-135M-Instruct GGUF (`smollm2-135m-instruct-gguf`), any `.gguf`
file, a local Hugging Face folder, or a hub id such as HuggingFaceTB/SmolLM2-135M. A data source
is a local file, folder or glob (readers.py) or `hf:NAME[:CONFIG[:SPLIT]]`.
"""
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from atomic import read_json, sha256_file
from data import EOS_TOKEN, Source
from errors import about
from gguf_io import OFFLINE_BASE, bundled_gguf, gguf_to_hf
from readers import check_readable
from tokenizer import fingerprint, full_vocab

# ----------------------------------------------------------------------------------------------
# The base model

# converted bases are cached here, keyed by the GGUF's content (BORI_CACHE moves it)
CACHE_DIR = Path(os.environ.get("BORI_CACHE", Path.home() / ".cache" / "bori"))


def resolve_base(spec: str, cache_dir=CACHE_DIR, seq_len: int = 0) -> Path:
    """A local Hugging Face folder for spec: the offline GGUF name, a .gguf file, a folder,
    or a hub id (downloaded with huggingface_hub). With seq_len, checked (check_base): a hub
    base's config and tokenizer before its weights are fetched."""
    cache_dir = Path(cache_dir)
    if spec == OFFLINE_BASE or spec.endswith(".gguf"):
        src = bundled_gguf() if spec == OFFLINE_BASE else Path(spec)
        if not src.is_file():
            raise FileNotFoundError(f"GGUF file {src} does not exist")
        # keyed by content: another file of the same name, or this one changed, converts anew
        out = cache_dir / f"{src.stem}-{sha256_file(src)[:16]}"
        if not (out / "model.safetensors").is_file():
            # shared: two ranks, runs or test workers may convert at once; the first one wins
            gguf_to_hf(src, out, shared=True)
        return check_base(out, seq_len) if seq_len else out
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_base(path, seq_len) if seq_len else path
    if is_hub_id(spec):
        from huggingface_hub import snapshot_download  # comes with datasets

        def fetch(patterns: list) -> Path:
            try:
                return Path(snapshot_download(spec, allow_patterns=patterns))
            except Exception as e:  # the hub client raises many types: offline, 404, auth
                raise FileNotFoundError(
                    f"could not fetch {spec!r} from the Hugging Face hub ({type(e).__name__}); "
                    f"check the name and network, or use a local folder or base={OFFLINE_BASE}"
                ) from e
        # config and tokenizer first (kilobytes): a base bori cannot train is refused before
        # hundreds of MB of its weights are downloaded
        if seq_len:
            check_base(fetch(["*.json"]), seq_len)
        # safetensors only: no pickled .bin weights (STYLE), and no ONNX or GGUF copies
        return fetch(["*.json", "*.safetensors", "tokenizer*", "*.txt"])
    raise FileNotFoundError(f"base model {spec!r} is neither a folder, a .gguf file, a hub id, "
                            f"nor {OFFLINE_BASE!r}")


def check_base(base_dir: Path, seq_len: int) -> Path:
    """The base folder has a config and a tokenizer bori can extend; seq_len fits. Returns
    base_dir."""
    if not (base_dir / "config.json").is_file() or not (base_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"base model folder {base_dir} lacks config.json or "
                                "tokenizer.json; pass a Hugging Face model folder or hub id")
    tok = read_json(base_dir / "tokenizer.json", "replace the base model's folder")
    # Byte-level, so every new token splits into base pieces (EEVE averages their rows) and the
    # merge can append BPE merges; EOS, because SmolLM2 adds no BOS and packing joins on it.
    if (tok["model"].get("type") != "BPE" or "ByteLevel" not in json.dumps(tok["pre_tokenizer"])
            or EOS_TOKEN not in full_vocab(tok)):
        raise ValueError(f"the base tokenizer in {base_dir} is not a byte-level BPE with "
                         f"{EOS_TOKEN} as its document separator (SmolLM2's kind), which "
                         "the tokenizer merge and the packing need; use a SmolLM/SmolLM2 base")
    config = read_json(base_dir / "config.json", "replace the base model's folder")
    kind = config.get("model_type", "llama")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in config]
    if kind != "llama" or missing:  # model.py is the Llama decoder and nothing else
        what = f"a {kind!r} model" if kind != "llama" else f"a config without {missing}"
        raise ValueError(f"the base model in {base_dir} is {what}; bori trains the Llama "
                         "architecture (SmolLM, SmolLM2, Llama): use such a base")
    n_tokens, n_rows = max(full_vocab(tok).values()) + 1, config.get("vocab_size", 0)
    if n_tokens > n_rows:  # more rows than tokens is padding (stage_init drops it); fewer, never
        raise ValueError(f"{base_dir}: tokenizer.json has {n_tokens} tokens but the model only "
                         f"{n_rows} rows; they do not belong together")
    max_pos = config.get("max_position_embeddings", seq_len)
    if seq_len > max_pos:  # past them RoPE meets angles the base never trained on
        raise ValueError(f"seq_len={seq_len} exceeds the base model's {max_pos} positions; "
                         f"use seq_len<={max_pos}")
    return base_dir


def check_merged_tokenizer(base_dir: Path, base_tok, n_rows: int, tok_dir: Path, emap: dict):
    """The base's tokenizer fits its model, and the merged tokenizer was built on this base."""
    # a model may have more rows than its tokenizer has tokens (padding), never fewer
    if base_tok.get_vocab_size() > n_rows:
        raise ValueError(f"{base_dir}: tokenizer.json has {base_tok.get_vocab_size()} tokens but "
                         f"the model only {n_rows} rows; they do not belong together")
    # EEVE pieces are base ids: on another base the new rows would be means of unrelated rows,
    # and nothing downstream would fail, so the vocabulary's fingerprint is compared here
    if (emap["base_vocab_size"] != base_tok.get_vocab_size() or emap["base_fingerprint"] !=
            fingerprint(json.loads(base_tok.to_str()))):
        raise ValueError(f"the merged tokenizer in {tok_dir} was built on another base than "
                         f"{base_dir}; delete {tok_dir} (or use a new out_dir) to rebuild it")


# ----------------------------------------------------------------------------------------------
# Data sources and the hub

HUB_TIMEOUT_S = 5  # one request per source, no retries: an offline machine answers at once


def is_hub_id(spec: str) -> bool:
    """owner/name that is no local path: a folder or file of that name wins over the hub."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and \
        not Path(spec).expanduser().exists() and not spec.endswith(".gguf")


def hub_token() -> str:
    """The user's Hugging Face token (HF_TOKEN, or what `huggingface-cli login` saved), or ''."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        from huggingface_hub import get_token  # comes with datasets
        return get_token() or ""
    except ImportError:
        return ""


def dataset_problem(answer: dict, config: str, split: str) -> str:
    """'' when a hub dataset's card lists config (and its split), or lists no configs (then the
    hub cannot say before the data is read); else what is missing and what there is."""
    configs = {c.get("config_name"): c for c in (answer.get("cardData") or {}).get("configs") or []}
    if not config or not configs:
        return ""
    if config not in configs:
        names = sorted(map(str, configs))
        return f"it has no config {config!r}; it has {names[:8]}{' ...' if len(names) > 8 else ''}"
    files = configs[config].get("data_files")
    splits = {f.get("split") for f in files if isinstance(f, dict)} if isinstance(files, list) \
        else set()
    if split and splits and split not in splits:
        return f"its config {config!r} has no split {split!r}; it has {sorted(splits)}"
    return ""


def check_hub(sources: dict):
    """Every hub source ({flag: spec}: hf:NAME[:CONFIG[:SPLIT]] datasets and base model ids)
    answers within HUB_TIMEOUT_S, with the config and split it names where the dataset's card
    lists them, or one sentence names the first that does not and the offline way out. The
    user's token goes along (a gated dataset answers 401 without it). Skipped with
    HF_HUB_OFFLINE=1 (a cached base model is then used as it is)."""
    urls = {}
    # HF_ENDPOINT is huggingface_hub's own variable for a mirror: ask where downloads will go
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    for flag, spec in sources.items():
        if spec.startswith("hf:"):  # hf:NAME:CONFIG:SPLIT#FIELD
            name, config, split = (spec[3:].split("#")[0].split(":") + ["", ""])[:3]
            urls[flag] = (spec, f"{endpoint}/api/datasets/{name}", config, split)
        elif flag == "base" and is_hub_id(spec):
            urls[flag] = (spec, f"{endpoint}/api/models/{spec}", "", "")
    if not urls or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    token = hub_token()

    def reach(url: str, config: str, split: str) -> tuple:
        """("", "") when url answers (and lists config and split), else (what kind of problem,
        the reason in a few words)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # HEAD where only existence matters; the dataset's card when a config is named
        request = urllib.request.Request(url, method="GET" if config else "HEAD",
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S) as answer:
                card = json.loads(answer.read() or b"{}") if config else {}
            return "name", dataset_problem(card, config, split)
        except urllib.error.HTTPError as e:
            return "reach", (f"HTTP {e.code}" if e.code != 401
                             else "HTTP 401: gated or private, log in (HF_TOKEN)")
        except (urllib.error.URLError, OSError) as e:  # no network, DNS, refused, timed out
            return "reach", str(getattr(e, "reason", e))
        except ValueError:  # an answer that is not JSON: the hub cannot tell, training will
            return "", ""
    # in parallel: five unreachable sources cost one timeout, not five
    with ThreadPoolExecutor(len(urls)) as pool:
        answers = dict(zip(urls, pool.map(lambda u: reach(*u[1:]), urls.values())))
    for flag, (kind, problem) in answers.items():
        if kind == "name" and problem:
            raise ValueError(f"--{flag}: {urls[flag][0]!r} on the Hugging Face hub: {problem}; "
                             "name them as hf:NAME:CONFIG:SPLIT")
        if problem:
            raise FileNotFoundError(
                f"--{flag}: could not reach {urls[flag][0]!r} on the Hugging Face hub "
                f"({problem}); offline, run --preset=demo, or point --data_new, --data_en, "
                "--eval_new, --eval_en and --base at local files and folders")


def check_sources(cfg, corpora: list):
    """Every local data path exists and starts as readable UTF-8 text, and every hub source
    (and a hub base model) answers, within seconds: before any stage reads them."""
    specs = {"base": cfg.base}
    for corpus in corpora:
        specs |= {corpus.train_flag: corpus.train, corpus.held_out_flag: corpus.held_out}
    specs["tokenizer_data"] = cfg.tokenizer_data
    check_hub(specs)
    base = Path(cfg.base).expanduser()
    if base.is_dir():  # a local folder costs nothing to check now; a GGUF or hub id is resolved
        check_base(base, cfg.seq_len)  # (converted, fetched) and checked by rank 0 first thing
    # Only each file's first bytes (readers.check_readable): UTF-16, a wrong JSON key or a
    # missing file fails in seconds, before any stage has read a corpus or written a file.
    for flag, spec in specs.items():
        if flag != "base" and spec and not spec.startswith("hf:"):
            src = Source(flag, spec, cfg.text_field)
            with about(flag):
                check_readable(src.path, src.text_field)
