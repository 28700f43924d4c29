"""Command-line plumbing shared by the device scripts, parsed before torch and triton are imported."""

from __future__ import annotations

import argparse
import os


def parse_with_out_and_dry_run(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser``'s arguments plus ``--out`` (default ``$OUT``, else ``.``) and ``--dry-run`` (tiny shapes on the
    CPU: sets ``TRITON_INTERPRET=1``, which triton reads when it first decorates a kernel, so call this first)."""
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    return args
