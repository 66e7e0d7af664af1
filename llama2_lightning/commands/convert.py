"""``llama2-lightning convert``: a checkpoint from one format to another."""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

from llama2_lightning.checkpoint.hf import dtype_name
from llama2_lightning.checkpoint.lightning import load_lightning
from llama2_lightning.checkpoint.load import EXPORT_FORMATS, FORMATS, load_checkpoint, save_checkpoint
from llama2_lightning.dtypes import DTYPES


def _build_convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama2-lightning convert",
        description="Convert a Llama 2 checkpoint between Meta's, Hugging Face's and Lightning's formats.",
    )
    parser.add_argument("--from", dest="src_format", required=True, choices=FORMATS, help="format of SRC")
    parser.add_argument("--to", dest="dst_format", required=True, choices=EXPORT_FORMATS, help="format to write")
    parser.add_argument("src", metavar="SRC", type=Path, help="checkpoint directory (meta, hf) or .ckpt file")
    parser.add_argument("dst", metavar="DST", type=Path, help="directory to create")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="Meta model-parallel shards to write (Llama 2 13B ships 2, 70B 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast floating-point weights (default: keep the source's dtype)")
    parser.add_argument("--prefix", default="model.",
                        help="with --from lightning: the state_dict prefix of the Transformer's weights")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DST")
    return parser


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cli_convert(argv: list[str] | None = None) -> int:
    """``llama2-lightning convert``: returns the process exit status."""
    args = _build_convert_parser().parse_args(argv)
    src: Path = args.src
    dst: Path = args.dst
    prog = "llama2-lightning convert"
    if dst.exists() and not dst.is_dir():
        print(f"{prog}: error: {dst} exists and is not a directory", file=sys.stderr)
        return 1
    if dst.is_dir() and any(dst.iterdir()) and not args.force:
        print(f"{prog}: error: {dst} is not empty; pass --force to replace it", file=sys.stderr)
        return 1

    tmp: Path | None = None
    try:
        if args.src_format == "lightning":
            config, state_dict = load_lightning(src, prefix=args.prefix)
        else:
            config, state_dict = load_checkpoint(src, args.src_format)
        if args.dtype is not None:
            dtype = DTYPES[args.dtype]
            state_dict = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state_dict.items()}

        # Write beside DST and rename, so an interrupted conversion never leaves a half-written DST.
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes it private (0700)
        save_checkpoint(config, state_dict, tmp, args.dst_format, num_shards=args.num_shards)
        if src.is_dir() and (src / "tokenizer.model").is_file():
            shutil.copy2(src / "tokenizer.model", tmp / "tokenizer.model")

        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.rename(dst, old / dst.name)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
        tmp = None
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError, pickle.UnpicklingError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    n_params = sum(t.numel() for t in state_dict.values())
    print(f"wrote {args.dst_format} checkpoint to {dst}: {n_params:,} parameters, {dtype_name(state_dict)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_convert())
