"""Shard datasets from the command line.

    python -m srtrain.data build SRC DEST [--split train=0.68,val=0.17,test=0.15] [--seed 2077]
                                          [--shard-size 128MB] [--min-size 256] [--workers N]
                                          [--train-scales 0.8,0.6]
    python -m srtrain.data inspect DEST
    python -m srtrain.data verify DEST

SRC is the IAPR TC-12 archive (iaprtc12.tgz, read without extracting), a folder of images or a
quoted glob; DEST a local directory or s3://bucket/prefix (endpoint: --endpoint-url or
AWS_ENDPOINT_URL; credentials: the standard AWS chain). Problems print one line and exit 1
(2 for bad arguments).
"""

from __future__ import annotations

import argparse
import logging
import sys

from srtrain.data import builder, manifest
from srtrain.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m srtrain.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build shards + manifest.json from photos")
    b.add_argument("src", help="IAPR TC-12 .tgz/.tar, a folder of images, or a quoted glob")
    b.add_argument("dest", help="local directory or s3://bucket/prefix")
    b.add_argument(
        "--split",
        default="train=0.68,val=0.17,test=0.15",
        help="split fractions (default: %(default)s)",
    )
    b.add_argument("--seed", type=int, default=2077, help="split and shuffle seed")
    b.add_argument("--shard-size", default="128MB", help="target shard size (default 128MB)")
    b.add_argument(
        "--min-size",
        type=int,
        default=256,
        help="skip images whose shorter side is below this (default 256)",
    )
    b.add_argument("--workers", type=int, default=0, help="checker processes (default: cores)")
    b.add_argument(
        "--train-scales",
        default="",
        metavar="F,F",
        help="also store each train photo downscaled by these factors in (0, 1), e.g. 0.8,0.6 "
        "(scale augmentation; val and test photos are never copied)",
    )
    b.add_argument("--no-progress", action="store_true")
    for name, help_text in (
        ("inspect", "counts, shard sizes, skipped files"),
        ("verify", "re-read every shard and check checksums"),
    ):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("dest", help="local directory or s3://bucket/prefix")
    for q in sub.choices.values():
        q.add_argument("--endpoint-url", default="", help="S3 endpoint (default AWS_ENDPOINT_URL)")
        q.add_argument("--region", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build":
            m = builder.build(
                args.src,
                args.dest,
                split=builder.parse_split(args.split),
                seed=args.seed,
                shard_size=builder.parse_size(args.shard_size),
                min_size=args.min_size,
                workers=args.workers,
                train_scales=builder.parse_scales(args.train_scales),
                endpoint_url=args.endpoint_url,
                region=args.region,
                progress=not args.no_progress,
            )
            print(manifest.describe(m, args.dest))
        elif args.command == "inspect":
            m = manifest.load_manifest(args.dest, args.endpoint_url, args.region)
            print(manifest.describe(m, args.dest))
        else:
            problems = manifest.verify(args.dest, args.endpoint_url, args.region)
            for line in problems:
                print(line, file=sys.stderr)
            if problems:
                print(f"{args.dest}: verify FAILED ({len(problems)} problems)", file=sys.stderr)
                return 1
            print(f"{args.dest}: verify OK (every shard matches its checksum)")
    except builder.BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
