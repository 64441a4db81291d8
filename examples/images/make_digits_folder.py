"""Writes scikit-learn's digits as an image folder per site: OUT/<site>/<class>/<n>.png.

    python examples/images/make_digits_folder.py OUT [--sites 2] [--test-fraction 0.2]

Sites are ``site-0`` .. ``site-<K-1>`` plus ``test``, each with one subfolder per digit
(``0`` .. ``9``) of 8x8 grayscale PNGs: the layout ``mpisplit data import`` reads, so each site
can import its own folder. Rows are dealt at random with a fixed seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_folders(out: Path, sites: int, test_fraction: float, seed: int = 0) -> list[Path]:
    """Write the folders; returns the site folders, the test folder last."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    test = int(round(test_fraction * len(order)))
    groups = {"test": order[:test]}
    for site, rows in enumerate(np.array_split(order[test:], sites)):
        groups[f"site-{site}"] = rows
    for name, rows in groups.items():
        for row in rows:
            folder = out / name / str(digits.target[row])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[row] * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{row}.png")
    return [out / name for name in (*list(groups)[1:], "test")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} already exists")
    for folder in write_folders(args.out, args.sites, args.test_fraction):
        print(folder)


if __name__ == "__main__":
    main()
