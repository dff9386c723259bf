"""Shared pieces of the benchmarks: Alpaca-like data, a BPE tokenizer, random Llama models,
machine facts, timers and tables. Nothing here is imported by the job itself.

The data is synthetic but shaped like Alpaca in tokens (with the tokenizer built here): a
prompt of ~28 tokens on average (instruction, an input on 40% of rows, the seed template) and a
response of ~65 with a long tail (lognormal, a few hundred tokens at p99, capped at 1000).
It is learnable: each row has a topic, named in the instruction, and the response follows
that topic's own word chain, so the loss on responses falls well below the unigram entropy
only when the model reads the prompt.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

# Random Llama shapes. Widths are multiples of 32; head dim 64.
MODELS = {
    # ~20M parameters: the default, sized so the default runs fit this 2-core machine.
    "llama-20m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 5,
                  "num_attention_heads": 8, "num_key_value_heads": 8, "vocab": 4096},
    # ~36M parameters: for --full runs on a quieter or larger machine.
    "llama-36m": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                  "num_attention_heads": 8, "num_key_value_heads": 8, "vocab": 8192},
}


# ---------------------------------------------------------------- machine and timing

def machine() -> dict[str, Any]:
    """Date, CPU model, cores, load average, versions: the header of every result."""
    import torch

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "host": platform.node(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def print_machine(info: dict[str, Any]) -> None:
    print(f"# {info['date']}  {info['cpu']}  nproc={info['nproc']}  "
          f"load avg {info['loadavg']}  torch {info['torch']} ({info['torch_threads']} threads)",
          flush=True)


def start(threads: int) -> dict[str, Any]:
    """A benchmark's start: torch's intra-op threads, the job's logging (the job's own lines
    at WARNING and above), the machine header printed; returns the machine facts."""
    import logging

    import torch

    from sft_job.pipeline import setup_logging

    torch.set_num_threads(threads)
    setup_logging()
    logging.getLogger("sft_job").setLevel(logging.WARNING)
    info = machine()
    print_machine(info)
    return info


class Clock:
    """Wall and process-CPU seconds of a block (CPU time counts every thread of the process;
    on a shared machine it moves far less than wall time with other people's load)."""

    def __enter__(self) -> Clock:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spread(xs: Sequence[float]) -> str:
    """'min / median / max' of a few runs (or the single value)."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return _fmt(xs[0])
    return f"{_fmt(min(xs))} / {_fmt(statistics.median(xs))} / {_fmt(max(xs))}"


def _fmt(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def table(headers: list[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (paste-able into RESULTS.md)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {path}", flush=True)


# ---------------------------------------------------------------- Alpaca-like data

_SYL = ["ka", "lo", "mi", "ter", "an", "so", "ve", "ri", "pu", "den", "gal", "bo", "ne", "shi",
        "tor", "ma", "el", "qu", "ix", "ra", "zen", "fo", "lu", "par", "di", "om", "sta", "gre"]
_VERBS = ["Write", "Explain", "List", "Describe", "Summarize", "Classify", "Give", "Generate",
          "Rewrite", "Name", "Identify", "Compare", "Suggest", "Create", "Translate", "Find"]


class _World:
    """Words, topics and per-topic word chains (deterministic for a seed)."""

    def __init__(self, seed: int = 0, n_words: int = 3000, n_topics: int = 48) -> None:
        rng = random.Random(seed)
        words: set[str] = set()
        while len(words) < n_words:
            words.add("".join(rng.choice(_SYL) for _ in range(rng.choice((1, 2, 2, 3)))))
        self.words = sorted(words)
        self.topics = self.words[:n_topics]
        self.chains = []
        for _ in range(n_topics):
            sub = rng.sample(self.words, 120)  # each topic speaks about 120 words
            self.chains.append({w: rng.sample(sub, 3) for w in sub})
        self.filler = self.words[n_topics:n_topics + 400]

    def walk(self, rng: random.Random, topic: int, n: int, start: str | None = None) -> list[str]:
        chain = self.chains[topic]
        w = start if start in chain else rng.choice(list(chain))
        out = []
        for _ in range(n):
            out.append(w)
            nxt = chain[w]
            w = nxt[0] if rng.random() < 0.6 else rng.choice(nxt)  # mostly predictable
        return out


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


def _budget_words(words: list[str], cost: dict[str, int], budget: int) -> list[str]:
    """The longest prefix of `words` whose tokens (word with a leading space) fit `budget`."""
    out, used = [], 0
    for w in words:
        c = cost.get(w, 2)
        if out and used + c > budget:
            break
        out.append(w)
        used += c
    return out


def alpaca_rows(n: int, seed: int = 0, tokenizer: Any = None) -> list[dict[str, str]]:
    """`n` Alpaca-like rows {instruction, input, output}. With `tokenizer`, lengths are drawn
    in its tokens (the distributions above); without, in words (for training the tokenizer)."""
    world = _World()
    rng = random.Random(seed)
    cost: dict[str, int] = {}
    if tokenizer is not None:
        for w in world.words + _VERBS:
            cost[w] = len(tokenizer(" " + w, add_special_tokens=False)["input_ids"])
    rows = []
    for _ in range(n):
        t = rng.randrange(len(world.topics))
        verb = rng.choice(_VERBS)
        n_ins = max(3, round(_lognormal(rng, 8.5, 0.45)))
        n_inp = max(2, min(400, round(_lognormal(rng, 26, 0.8)))) if rng.random() < 0.4 else 0
        if rng.random() < 0.15:
            n_out = rng.randint(1, 5)  # one-word answers (classification, names)
        else:
            n_out = max(2, min(1000, round(_lognormal(rng, 76, 0.85))))
        ins = [verb, "about", world.topics[t]] + [rng.choice(world.filler) for _ in range(n_ins)]
        inp = world.walk(rng, t, n_inp) if n_inp else []
        chain_words = list(world.chains[t])
        out = world.walk(rng, t, n_out + 5, start=chain_words[_VERBS.index(verb)])
        if tokenizer is not None:
            ins = _budget_words(ins, cost, n_ins + 3)
            out = _budget_words(out, cost, n_out)
            inp = _budget_words(inp, cost, n_inp) if n_inp else []
        else:
            out = out[:n_out]
        rows.append({"instruction": " ".join(ins) + ".", "input": " ".join(inp),
                     "output": " ".join(out) + "."})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


# ---------------------------------------------------------------- tokenizer and model

def build_tokenizer(out: Path, vocab: int) -> Any:
    """A byte-level BPE like builtin:tiny-llama's (same special tokens, pad != EOS), trained
    on the Alpaca-like text so common words are one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sft_job.data.formats import alpaca_prompt
    from sft_job.models.chat import CHATML_TEMPLATE

    corpus = [alpaca_prompt(r["instruction"], r["input"], "seed") + " " + r["output"]
              for r in alpaca_rows(6000, seed=12345)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(out)
    return fast


def build_model_dir(out: Path, preset: str, seed: int = 0) -> Path:
    """Tokenizer + random Llama (`preset` from MODELS) saved as a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(MODELS[preset])
    tok = build_tokenizer(out, shape.pop("vocab"))
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      max_position_embeddings=2048, tie_word_embeddings=False, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_random_llama(out: Path, config: dict[str, Any], dtype: str, shard_mb: int = 400,
                       seed: int = 0) -> int:
    """Random Llama weights (`config` for LlamaConfig) written as safetensors shards plus
    config.json, without building the model in memory: one shard's tensors at a time, so
    models of several GB are cheap to make. Returns the bytes written."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**config)
    with torch.device("meta"):
        keys = {k: tuple(v.shape)
                for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, Any] = {}
    size = total = 0

    def flush() -> None:
        path = out / f"shard-{len(written):05d}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for k, shape in keys.items():
        t = torch.ones(shape, dtype=dt) if "norm" in k else \
            (torch.randn(shape, generator=g) * 0.02).to(dt)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_mb * 1024**2:
            flush()
            size = 0
        shard[k] = t
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, (path, names) in enumerate(written):
        name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / name)
        weight_map.update(dict.fromkeys(names, name))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


REAL_MODELS = {"smollm2-135m": "builtin:smollm2-135m"}  # real weights: LoRA, not full FT


def model_dir(preset: str) -> Path:
    """The benchmark model `preset`, built once under $SFT_JOB_CACHE/bench/ (or, for a real
    model, the job's builtin copy)."""
    import tempfile

    from sft_job.storage.cache import cache_root

    if preset in REAL_MODELS:
        from sft_job.models.source import resolve_model_dir

        return resolve_model_dir(REAL_MODELS[preset])

    d = cache_root() / "bench" / f"{preset}-v1"
    if not (d / "config.json").is_file():
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=d.parent))
        build_model_dir(tmp, preset)
        tmp.replace(d)
    return d


def seed_trainer(mdir: Path, rows: list[dict[str, list[int]]], targs: Any, callbacks: list[Any],
                 count: Any, *, dtype: str = "float32", pad_to: int | None = None,
                 peft: Any = None) -> tuple[Any, Any, Any]:
    """The seeds' recipe: HF Trainer over the rows' input_ids with
    DataCollatorForLanguageModeling(mlm=False) (loss on every token, padded to the longest row
    of each batch or to a multiple of `pad_to`), the model loaded with sdpa in `dtype` (LoRA
    on it with `peft`). `count` wraps the collator. Returns (trainer, collator, tokenizer)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer
    from transformers.trainer_callback import PrinterCallback

    tok = AutoTokenizer.from_pretrained(str(mdir))
    model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    if peft is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft)
    collator = count(DataCollatorForLanguageModeling(tok, mlm=False, pad_to_multiple_of=pad_to))
    trainer = Trainer(model=model, args=targs, data_collator=collator, callbacks=callbacks,
                      train_dataset=Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows]))
    trainer.remove_callback(PrinterCallback)
    return trainer, collator, tok


def padded(rows: list[dict[str, list[int]]], pad_id: int) -> tuple[Any, Any, Any]:
    """`rows` (input_ids, labels) as one batch padded to the longest: ids, attention mask and
    labels (-100 on padding)."""
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    lab = torch.full((len(rows), n), -100)
    for j, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[j, :k], mask[j, :k] = torch.tensor(r["input_ids"]), 1
        lab[j, :k] = torch.tensor(r["labels"])
    return ids, mask, lab


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def length_stats(prompt_lens: list[int], resp_lens: list[int]) -> dict[str, float]:
    """Mean prompt/response tokens and percentiles of the total, as printed with the data."""
    tot = sorted(p + r for p, r in zip(prompt_lens, resp_lens, strict=True))
    q = lambda f: tot[min(len(tot) - 1, int(f * len(tot)))]  # noqa: E731
    return {"prompt_mean": round(statistics.mean(prompt_lens), 1),
            "response_mean": round(statistics.mean(resp_lens), 1),
            "total_mean": round(statistics.mean(tot), 1), "p50": q(0.5), "p90": q(0.9),
            "p99": q(0.99), "max": tot[-1]}
