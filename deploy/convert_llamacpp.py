#!/usr/bin/env python3
"""Convert a checkpoint to GGUF with llama.cpp's own converter (`convert_hf_to_gguf.py`).

    python3 deploy/convert_llamacpp.py LLAMA_CPP_SRC CHECKPOINT_DIR OUT.gguf [--outtype bf16]

LLAMA_CPP_SRC is a llama.cpp source tree (for example `vendor/llama.cpp` of PyPI's
`llama-cpp-python` sdist); its `gguf-py` is used, so the converter and the format match the
binaries built from the same tree. The converter runs unchanged but for one thing: for a
byte-level BPE tokenizer it looks up the pre-tokenizer by hashing the token ids of a test string
and refuses hashes of tokenizers it was not taught. A generated checkpoint's tokenizer
(`switchyard model bench` writes one, see worker/src/synth_tokenizer.rs) has its own vocabulary,
so no hash can match; its pre-tokenizer is the Qwen2 one, which is what this script answers when,
and only when, the converter's own lookup refuses. Tokenization does not enter a throughput
benchmark (both engines are fed token ids).
"""
import argparse
import logging
import runpy
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="llama.cpp source tree")
    ap.add_argument("model", type=Path, help="Hugging Face checkpoint directory")
    ap.add_argument("out", type=Path, help="GGUF file to write")
    ap.add_argument("--outtype", default="bf16", help="converter --outtype (default bf16: the checkpoint's own dtype)")
    a = ap.parse_args()
    script = a.src / "convert_hf_to_gguf.py"
    if not script.is_file():
        sys.exit(f"{script}: not found (is {a.src} a llama.cpp source tree?)")
    sys.path[:0] = [str(a.src), str(a.src / "gguf-py")]
    from conversion import base  # llama.cpp's converter package, from the tree above

    lookup = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer):
        try:
            return lookup(self, tokenizer)
        except NotImplementedError:
            logging.getLogger("convert_llamacpp").warning("pre-tokenizer hash not known to llama.cpp: using qwen2 (the generated tokenizer's)")
            return "qwen2"

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = [str(script), str(a.model), "--outfile", str(a.out), "--outtype", a.outtype]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
