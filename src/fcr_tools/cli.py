"""The ``fcr-tools`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from ._demo import format_summary, run_demo

    report = run_demo(
        args.out,
        quick=args.quick,
        max_epochs=args.epochs,
        seed=args.seed,
        accelerator=args.accelerator,
        progress_bar=not args.no_progress,
    )
    print(format_summary(report))
    print(f"Report: {args.out}/report.md (and report.json, umap_latents.png, model/).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fcr-tools``."""
    parser = argparse.ArgumentParser(
        prog="fcr-tools",
        description="FCR: factorized causal representations of single-cell perturbation "
        "responses.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="simulate a screen, train FCR, plot latents and score counterfactuals",
        description="Simulate a perturbation screen with known ground truth, train FCR on it "
        "with some (cell line, drug) pairs held out, write the latents and their UMAPs, score "
        "counterfactual predictions of the held-out pairs against the exact truth and the "
        "baselines, and save a report (JSON + Markdown) and the model.",
    )
    demo.add_argument("--out", required=True, help="output directory")
    demo.add_argument("--quick", action="store_true", help="small screen, few epochs")
    demo.add_argument("--epochs", type=int, default=None, help="override training epochs")
    demo.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    demo.add_argument("--accelerator", default="auto", help="Lightning accelerator")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fcr-tools``."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"fcr-tools {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
