"""Prepare a dataset once (tokenizer + token files); every run then only memory-maps it.

    python prepare_data.py                                         # TinyStories from the hub -> data/tinystories-4096
    python prepare_data.py --data-files TinyStoriesV2-GPT4-train.txt --out data/ts-v2-4096
    python prepare_data.py --generated                              # offline: the project's generated stories
    python train_tinystories.py --dataset data/tinystories-4096    # then train on it (several runs may share it)

Running it again with the same data and settings says the dataset is already prepared; other data or settings
need --force (the old dataset is replaced only once the new one is complete). Exit codes: 0 prepared (or
already prepared), 1 a write failed (nothing half-written is left), 2 bad input (before any work), 130 stopped.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from data.prepared import CPUS, TOKENIZER_SAMPLE_BYTES, PreparedDataset, describe_source, prepare_dataset
from data.text import DataError
from common.files import NotEnoughSpace, WriteFailed


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Options take - or _: --vocab_size, --vocab-size.")
    p.add_argument("--data-files", "--data_files", nargs="+", metavar="F",
                   help="local TinyStories .txt (<|endoftext|> separated) or .json/.jsonl (default: the hub)")
    p.add_argument("--generated", action="store_true",
                   help="the project's generated stories (offline, NOT TinyStories)")
    p.add_argument("--out", help="directory to prepare (default data/tinystories-<vocab_size>, or "
                   "data/generated-<vocab_size> with --generated)")
    p.add_argument("--vocab_size", "--vocab-size", type=int, default=4096,
                   help="tokens of the byte-level BPE (default %(default)s)")
    p.add_argument("--workers", type=int, default=CPUS,
                   help="tokenizing processes (default: the usable cores, %(default)s)")
    p.add_argument("--max_stories", "--max-stories", type=int, default=0, help="training stories to keep (0: all)")
    p.add_argument("--val_fraction", "--val-fraction", type=float, default=0.05,
                   help="share of the stories held out for validation when the source has no validation split "
                   "(default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the held-out split and the tokenizer's sample (default %(default)s)")
    p.add_argument("--offline_stories", "--offline-stories", type=int, default=20000,
                   help="with --generated: how many (default %(default)s)")
    p.add_argument("--tokenizer-sample-mb", "--tokenizer_sample_mb", type=float, default=TOKENIZER_SAMPLE_BYTES / 1e6,
                   help="MB of training text the tokenizer is trained on (default %(default)g)")
    p.add_argument("--tokenizer-from", "--tokenizer_from", metavar="DIR",
                   help="reuse this saved tokenizer (e.g. another prepared dataset's tokenizer/) instead of training")
    p.add_argument("--force", action="store_true", help="replace a dataset prepared with other data or settings")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = f"data/{'generated' if args.generated else 'tinystories'}-{args.vocab_size}"
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        ds = prepare_dataset(args.out, args.data_files, args.vocab_size,
                             origin="generated" if args.generated else "auto", val_fraction=args.val_fraction,
                             seed=args.seed, max_stories=args.max_stories, offline_stories=args.offline_stories,
                             workers=args.workers, tokenizer_sample_bytes=round(args.tokenizer_sample_mb * 1e6),
                             tokenizer_from=args.tokenizer_from, force=args.force)
    except (DataError, NotEnoughSpace) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nStopped; nothing was left in {args.out}'s place: run the same command again to prepare it.",
              file=sys.stderr)
        return 130
    print(summary(ds, args.out))
    return 0


def summary(ds: PreparedDataset, out: str) -> str:
    """Stories, tokens, bytes per token and the rate of each split, then the command that trains on it."""
    lines = [f"Prepared {out}: {describe_source(ds.meta['source'])}, vocab {ds.vocab_size:,}, "
             f"fingerprint {ds.fingerprint[:12]}"]
    for split in ("train", "val"):
        m = ds.meta[split]
        rate = m["n_bytes"] / 1e6 / max(m["seconds"], 1e-9)
        lines.append(f"  {split:5s} {m['n_stories']:>11,} stories {m['n_bytes'] / 1e6:>9,.1f} MB -> "
                     f"{m['n_tokens']:>13,} tokens ({m['n_bytes'] / m['n_tokens']:.2f} bytes/token), "
                     f"tokenized at {rate:.2f} MB/s with {ds.meta['workers']} worker(s)")
    lines += ["Train on it (several runs can share it):", f"  python train_tinystories.py --dataset {shlex.quote(out)}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
