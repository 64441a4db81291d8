"""Writes a token dataset from text every Python ships: the language reference topics of
``pydoc_data`` (English prose, about 460 kB), as bytes (vocabulary 128, non-ASCII -> '?').

Each row is a window of ``--context`` tokens (features) and the token after it (label); the
windows are split into one shard per client and a test set held out from the end.

    python examples/transformer/corpus.py --clients 1 --out data/pydoc-1c
"""

from __future__ import annotations

import argparse
from pydoc_data.topics import topics

import numpy as np

from mpisplit.prepare import write_arrays

VOCAB = 128


def tokens() -> np.ndarray:
    text = "\n".join(topics[key] for key in sorted(topics))
    return np.frombuffer(text.encode("ascii", errors="replace"), np.uint8).astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--windows", type=int, default=2048, help="training windows in all")
    parser.add_argument("--test-windows", type=int, default=512)
    args = parser.parse_args()
    ids = tokens()
    stride = (len(ids) - args.context - 1) // (args.windows + args.test_windows)
    starts = np.arange(args.windows + args.test_windows) * stride
    features = np.stack([ids[s : s + args.context] for s in starts]).astype(np.float32)
    labels = ids[starts + args.context]
    train = np.array_split(np.arange(args.windows), args.clients)
    clients = [(features[rows], labels[rows]) for rows in train]
    test = (features[args.windows :], labels[args.windows :])
    print(f"wrote {write_arrays(args.out, clients, test, dataset='pydoc', num_classes=VOCAB)}")


if __name__ == "__main__":
    main()
