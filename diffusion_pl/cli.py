"""Command-line entry point `diffusion-pl` (placeholder until the Lightning layer lands)."""

import sys


def main(argv=None) -> int:
    print("usage: diffusion-pl {fit,validate,test,sample,evaluate} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
