"""``llama2-lightning convert``: a checkpoint from one format to another, its tokenizer with it.

DST is a directory for ``--to meta|hf|lightning`` (``lightning`` writes ``DST/model.ckpt``) and a file
for ``--to gguf``. The tokenizer travels: from a GGUF source a ``tokenizer.json`` +
``tokenizer_config.json`` are built from the file's vocabulary; from a directory its tokenizer files
are copied; into a GGUF file the tokenizer's vocabulary (``--tokenizer``, else the one beside SRC) is
written as llama.cpp's ``tokenizer.*`` fields.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

from llama2_lightning.checkpoint.gguf import GGUF_TYPES, gguf_tokenizer_fields, read_gguf
from llama2_lightning.checkpoint.hf import dtype_name
from llama2_lightning.checkpoint.lightning import load_lightning
from llama2_lightning.checkpoint.load import EXPORT_FORMATS, FORMATS, load_checkpoint, save_checkpoint
from llama2_lightning.dtypes import DTYPES
from llama2_lightning.tokenizer import Tokenizer, find_tokenizer
from llama2_lightning.tokenizer_files import tokenizer_json_from_gguf_fields, write_hf_tokenizer_files

# Files that describe a tokenizer beside its weights; copied along with a directory checkpoint.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def _build_convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama2-lightning convert",
        description="Convert a Llama checkpoint between Meta's, Hugging Face's, Lightning's and GGUF formats.",
    )
    parser.add_argument("--from", dest="src_format", required=True, choices=FORMATS, help="format of SRC")
    parser.add_argument("--to", dest="dst_format", required=True, choices=EXPORT_FORMATS, help="format to write")
    parser.add_argument("src", metavar="SRC", type=Path, help="checkpoint directory (meta, hf), .ckpt or .gguf file")
    parser.add_argument("dst", metavar="DST", type=Path, help="directory to create (a .gguf file for --to gguf)")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="Meta model-parallel shards to write (Llama 2 13B ships 2, 70B 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast floating-point weights (default: keep the source's dtype)")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default="F16",
                        help="with --to gguf: the matrices' type (norms stay F32; F32/F16/BF16 round-trip exactly)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="with --to gguf: tokenizer.model / tokenizer.json / directory whose vocabulary to embed "
                             "(default: the one beside SRC)")
    parser.add_argument("--prefix", default="model.",
                        help="with --from lightning: the state_dict prefix of the Transformer's weights")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DST")
    return parser


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy_tokenizer(src: Path, dst: Path, gguf_meta: dict | None) -> str | None:
    """Put the source's tokenizer into the directory ``dst``; returns what was written, for the summary."""
    if gguf_meta is not None:
        try:
            text, special = tokenizer_json_from_gguf_fields(gguf_meta, str(src))
        except ValueError as err:  # e.g. a SentencePiece vocabulary: the weights are still useful
            print(f"llama2-lightning convert: warning: no tokenizer written: {err}", file=sys.stderr)
            return None
        write_hf_tokenizer_files(text, special, dst)
        return "tokenizer.json + tokenizer_config.json (from the GGUF vocabulary)"
    base = src if src.is_dir() else src.parent
    copied = [name for name in TOKENIZER_FILES if (base / name).is_file()]
    for name in copied:
        shutil.copy2(base / name, dst / name)
    return " + ".join(copied) or None


def _patch_special_ids(dst: Path, tokenizer: Tokenizer) -> None:
    """Hugging Face's generate stops at config.json's EOS: make it the tokenizer's (save_hf writes Llama 2's
    SentencePiece ids, right for a tokenizer.model)."""
    for name in ("config.json", "generation_config.json"):
        path = dst / name
        data = json.loads(path.read_text())
        data.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
        if name == "config.json":
            data["pad_token_id"] = tokenizer.pad_id
        path.write_text(json.dumps(data, indent=2) + "\n")


def cli_convert(argv: list[str] | None = None) -> int:
    """``llama2-lightning convert``: returns the process exit status."""
    args = _build_convert_parser().parse_args(argv)
    src: Path = args.src
    dst: Path = args.dst
    prog = "llama2-lightning convert"
    to_file = args.dst_format == "gguf"
    if dst.exists() and to_file and not dst.is_file():
        print(f"{prog}: error: {dst} exists and is not a file", file=sys.stderr)
        return 1
    if dst.exists() and not to_file and not dst.is_dir():
        print(f"{prog}: error: {dst} exists and is not a directory", file=sys.stderr)
        return 1
    if dst.exists() and (to_file or any(dst.iterdir())) and not args.force:
        print(f"{prog}: error: {dst} is not empty; pass --force to replace it", file=sys.stderr)
        return 1

    tmp: Path | None = None
    written = None
    try:
        gguf_meta = None
        if args.src_format == "lightning":
            config, state_dict = load_lightning(src, prefix=args.prefix)
        elif args.src_format == "gguf":
            config, state_dict, gguf_meta = read_gguf(src)  # one read of the file for weights and vocabulary
        else:
            config, state_dict = load_checkpoint(src, args.src_format)
        if args.dtype is not None:
            dtype = DTYPES[args.dtype]
            state_dict = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state_dict.items()}

        # Write beside DST and rename, so an interrupted conversion never leaves a half-written DST.
        dst.parent.mkdir(parents=True, exist_ok=True)
        if to_file:
            tok_path = args.tokenizer or find_tokenizer(src)
            tokenizer = Tokenizer(tok_path) if tok_path is not None else None
            if tokenizer is None:
                print(f"{prog}: warning: no tokenizer beside {src} (pass --tokenizer): the GGUF file gets no "
                      "vocabulary, which llama.cpp needs", file=sys.stderr)
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            save_checkpoint(config, state_dict, tmp, "gguf", gguf_type=args.gguf_type,
                            gguf_tokenizer=gguf_tokenizer_fields(tokenizer) if tokenizer is not None else None)
            written = f"the vocabulary of {tokenizer.model_path}" if tokenizer is not None else None
            os.replace(tmp, dst)
            tmp = None
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
            os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes it private (0700)
            target = tmp / "model.ckpt" if args.dst_format == "lightning" else tmp
            save_checkpoint(config, state_dict, target, args.dst_format, num_shards=args.num_shards)
            written = _copy_tokenizer(src, tmp, gguf_meta)
            if args.dst_format == "hf" and (tmp / "tokenizer.json").is_file() and not (tmp / "tokenizer.model").is_file():
                _patch_special_ids(tmp, Tokenizer(tmp / "tokenizer.json"))
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
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)

    n_params = sum(t.numel() for t in state_dict.values())
    kind = f"gguf ({args.gguf_type})" if to_file else args.dst_format
    print(f"wrote {kind} checkpoint to {dst}: {n_params:,} parameters, {dtype_name(state_dict)}"
          + (f"; tokenizer: {written}" if written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli_convert())
