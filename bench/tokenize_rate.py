"""How fast prepare_data.py tokenizes, and what preparing the full TinyStories would take.

    python bench/tokenize_rate.py                 # ~100 MB built from ../shared/data/tinystories/train.txt

The text is the real 3.7 MB TinyStories sample repeated, its stories shuffled anew in each copy (seeded), so
repeated words may flatter the tokenizer's word cache: the rates are an upper bound for real text. Measured:
tokenizing rate (MB/s of UTF-8 text, tokens/s) with 1 and 2 worker processes and with one process using the
tokenizers library's own (Rayon) threads; the tokenizer's training time on 10, 30 and 100 MB samples; how
much a bigger sample still gains (tokens per byte on held-out real text); the reading time; tokens per byte
at vocab 4096 and 2048 on the real sample. Then an extrapolation to the full 1.9 GB TinyStories on 16 cores.
Figures, not assertions. Writes tokenize_rate.json to --out-dir (bench/results).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data.prepared as prepared  # noqa: E402
from data.text import EOT, read_stories_file  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                      "tinystories", "train.txt")
FULL_BYTES = 1.9e9  # UTF-8 text of TinyStories' train split (2.12M stories)


def build_text(path: str, mb: float, seed: int = 0) -> int:
    """Write >= mb MB of TinyStories-layout text from the real sample, shuffled per copy; its size in bytes."""
    stories, rng, size = read_stories_file(SAMPLE), random.Random(seed), 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            rng.shuffle(stories)
            block = "".join(f"{s}\n{EOT}\n" for s in stories)
            f.write(block)
            size += len(block.encode())
    return size


def tokenizer_times(text: str, out_dir: str, sizes_mb=(10, 30, 100)) -> dict:
    """Seconds to train the 4096-token tokenizer on each sample size (transformers already imported); the
    last one is saved to out_dir for the tokenizing runs."""
    import transformers  # noqa: F401  (first: its seconds-long import is not tokenizer training)

    from data.text import load_corpus
    from data.tokenizer import save_tokenizer, train_tokenizer

    train, times = load_corpus([text], 0.05, None, 0).train, {}
    for mb in sizes_mb:
        started = time.perf_counter()
        sample = prepared.tokenizer_sample(train, int(mb * 1e6), 0)
        tok = train_tokenizer(sample, 4096)
        times[f"{mb}_mb"] = round(time.perf_counter() - started, 1)
        print(f"tokenizer on {mb} MB: {times[f'{mb}_mb']} s (load average {load_now()})")
    save_tokenizer(tok, out_dir)
    return times


def sample_size_gain(fractions=(0.125, 0.25, 0.5, 1.0)) -> dict:
    """Tokens per byte of the real sample's held-out stories for tokenizers trained on growing parts of the
    rest: the gain still left from a bigger sample (real text only, so at most 3.4 MB)."""
    from data.text import load_corpus
    from data.tokenizer import train_tokenizer

    corpus, out = load_corpus([SAMPLE], 0.1, None, 0), {}
    val_bytes = sum(len(s.encode()) for s in corpus.val)
    for frac in fractions:
        part = corpus.train[: round(len(corpus.train) * frac)]
        tok = train_tokenizer(part, 4096)
        n = sum(len(x) for x in tok(corpus.val, add_special_tokens=False)["input_ids"])
        out[f"{sum(len(s.encode()) for s in part) / 1e6:.2f}_mb"] = round(n / val_bytes, 4)
    return out


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


def prepare(out: str, files: list[str], vocab: int, workers: int, **kw) -> dict:
    lines: list[str] = []
    ds = prepared.prepare_dataset(out, files, vocab, workers=workers, log=lambda s: (lines.append(s), print(s)), **kw)
    m = ds.meta
    tokenize = m["train"]["seconds"]
    return {"workers": m["workers"], "text_mb": round(m["train"]["n_bytes"] / 1e6, 1),
            "tokenize_s": round(tokenize, 1), "mb_per_s": round(m["train"]["n_bytes"] / 1e6 / tokenize, 2),
            "tokens_per_s": round(m["train"]["n_tokens"] / tokenize), "read_s": m["seconds"]["read"],
            "load_average_after": load_now()}


def rayon_rate(ds_dir: str, files: list[str], seed: int) -> dict:
    """One process, the tokenizers library's own threads (all cores) over the same chunks as the workers get."""
    from tokenizers import Tokenizer

    from data.text import load_corpus

    train = load_corpus(files, 0.05, None, seed).train
    tok = Tokenizer.from_file(os.path.join(ds_dir, "tokenizer", "tokenizer.json"))
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    started = time.perf_counter()
    eos = json.load(open(os.path.join(ds_dir, "prepared.json")))["eos_id"]
    stats = prepared.write_split(train, lambda chunks: (prepared.encode_chunk(tok, eos, c) for c in chunks),
                                  os.path.join(ds_dir, "rayon.bin"), "train (rayon)", print)
    seconds = time.perf_counter() - started
    same = open(os.path.join(ds_dir, "rayon.bin"), "rb").read() == open(os.path.join(ds_dir, "train.bin"), "rb").read()
    return {"threads": os.cpu_count(), "mb_per_s": round(stats["n_bytes"] / 1e6 / seconds, 2),
            "tokens_per_s": round(stats["n_tokens"] / seconds), "identical_to_workers": same,
            "load_average_after": load_now()}


def tokens_per_byte(work: str) -> dict:
    """On the real sample, its tokenizer trained on its own training split (all of it: 3.4 MB < the sample)."""
    out = {}
    for vocab in (4096, 2048):
        ds = prepared.prepare_dataset(os.path.join(work, f"real-{vocab}"), [SAMPLE], vocab, workers=1,
                                      log=lambda _: None)
        t, v = ds.meta["train"], ds.meta["val"]
        stories = t["n_stories"] + v["n_stories"]
        out[str(vocab)] = {
            "train_tokens_per_byte": round((t["n_tokens"] - t["n_stories"]) / t["n_bytes"], 4),
            "val_tokens_per_byte": round((v["n_tokens"] - v["n_stories"]) / v["n_bytes"], 4),
            "tokens_with_eos_per_file_byte": round((t["n_tokens"] + v["n_tokens"]) / os.path.getsize(SAMPLE), 4),
            "stories": stories}
    return out


def extrapolate(one: dict, two: dict, tok_s: float, read_mb_s: float, cores: int = 16) -> dict:
    """Full TinyStories on `cores` cores: tokenizing scales by the measured 1 -> 2 worker efficiency (assumed to
    hold up to `cores`); reading is one process; tokenizer training is taken as measured here (an upper bound:
    its word counting is itself multi-threaded)."""
    efficiency = two["mb_per_s"] / (2 * one["mb_per_s"])
    rate = one["mb_per_s"] * cores * efficiency
    tokenize_s, read_s = FULL_BYTES / 1e6 / rate, FULL_BYTES / 1e6 / read_mb_s
    return {"cores": cores, "full_text_gb": FULL_BYTES / 1e9, "efficiency_1_to_2_workers": round(efficiency, 3),
            "tokenize_mb_per_s": round(rate, 1), "tokenize_s": round(tokenize_s), "read_s": round(read_s),
            "tokenizer_train_s": round(tok_s), "total_s": round(tokenize_s + read_s + tok_s),
            "assumption": f"tokenizing rate = 1-worker rate x {cores} x the 1->2 worker efficiency measured here "
                          "(linear in cores up to 16 at that efficiency); reading the .txt single-process at the "
                          "rate measured here; tokenizer training time as measured on 2 cores"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=100, help="MB of text to tokenize")
    p.add_argument("--out-dir", default=os.path.join("bench", "results"))
    p.add_argument("--work-dir", help="where the big text and datasets go (default: a temporary directory, removed)")
    args = p.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="tokenize_rate-")
    os.makedirs(work, exist_ok=True)
    try:
        text = os.path.join(work, "repeated.txt")
        size = build_text(text, args.mb)
        print(f"{size / 1e6:.1f} MB of text in {text}; load average {load_now()}")
        tok_dir = os.path.join(work, "tokenizer")
        tok_times = tokenizer_times(text, tok_dir)
        one = prepare(os.path.join(work, "w1"), [text], 4096, 1, tokenizer_from=tok_dir)
        two = prepare(os.path.join(work, "w2"), [text], 4096, 2, tokenizer_from=tok_dir)
        rayon = rayon_rate(os.path.join(work, "w1"), [text], 0)
        tpb = tokens_per_byte(work)
        gain = sample_size_gain()
        result = {
            "text": {"mb": round(size / 1e6, 1), "built_from": "../shared/data/tinystories/train.txt (4,483 real "
                     "stories, 3.7 MB) repeated, stories shuffled per copy: repeated words may flatter the "
                     "tokenizer's word cache, so rates are an upper bound for real text"},
            "machine": {"cores": os.cpu_count(), "note": "shared with other jobs: load averages are recorded"},
            "workers_1": one, "workers_2": two, "rayon_one_process": rayon,
            "tokenizer_training_s": tok_times | {"vocab": 4096, "note": "2 shared cores; sample chosen from the "
                                                "repeated text, so fewer distinct words than real text"},
            "tokenizer_sample_gain": {"held_out_tokens_per_byte_by_training_mb": gain, "note": "real text, vocab "
                                      "4096; lower is better"},
            "read_mb_per_s": round(one["text_mb"] / one["read_s"], 1),
            "tokens_per_byte_real_sample": tpb,
            "extrapolation_full_tinystories": extrapolate(one, two, tok_times["100_mb"],
                                                          one["text_mb"] / one["read_s"]),
        }
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "tokenize_rate.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
