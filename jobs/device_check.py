"""The KV path measured on a GPU (pipeline/bench/device_check.py): prints a table and writes
device_check.json. It runs where only torch is installed (a GPU machine without vLLM, Ray or
Hydra), so it takes plain arguments instead of a Hydra config.

    python -m jobs.device_check [--out device_check.json] [--device cuda] [--repeats 3]
"""

import argparse

import torch

from pipeline.bench.device_check import run, summary, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="device_check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report = run(torch.device(args.device), repeats=args.repeats)
    print(summary(report))
    write(report, args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
