"""Text corpora → document-level train/validation/test splits → token blocks of ``context + steps + 1`` tokens.

Sources (``source`` in configs, ``--data`` on the CLI):

* ``enwiki`` (default, offline): the 105 English Wikipedia articles shipped as test data in the ``gensim`` wheel,
  markup stripped with gensim's own ``filter_wiki`` (CC BY-SA 3.0 text);
* a ``.txt`` file (documents separated by blank-line-delimited ``= Title =`` headings or, failing that, by three
  newlines) or a folder of ``.txt`` files (one document per file);
* ``hf:<dataset>[/<config>]`` — an HF dataset with a ``text`` field, for users with hub access (e.g.
  ``hf:wikitext/wikitext-2-raw-v1``); its own splits are mapped to ours.

Splits are **by document** (a stable hash of the document title/text decides), so no text is shared between train,
validation and test. Blocks never straddle documents; no BOS/EOS is added (as in the reference).
"""
from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np

from sol.errors import SolError
from sol.io import atomic_path
from sol.models import cache_dir

SPLITS = ("train", "validation", "test")
ENWIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
ENWIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"


def split_of(key: str, fractions=(0.75, 0.10, 0.15)) -> str:
    """Deterministic document → split assignment from a stable hash of ``key``."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16 ** 8
    return "train" if u < fractions[0] else "validation" if u < fractions[0] + fractions[1] else "test"


def _enwiki_documents() -> list[tuple[str, str]]:
    out = cache_dir() / "corpora" / "enwiki.jsonl"
    if out.is_file():
        return [tuple(json.loads(line)) for line in out.read_text().splitlines()]
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise SolError("the default corpus needs the gensim wheel; install it with: pip install --no-deps gensim==4.4.0")
    path = Path(spec.submodule_search_locations[0]) / ENWIKI
    if hashlib.sha256(path.read_bytes()).hexdigest() != ENWIKI_SHA256:
        raise SolError(f"checksum mismatch for {path}; reinstall with: pip install --no-deps --force-reinstall gensim==4.4.0")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    docs = []
    for title, text, _ in extract_pages(bz2.open(path), filter_namespaces=("0",)):
        if text.lower().startswith("#redirect"):
            continue
        clean = re.sub(r"'{2,}", "", filter_wiki(text))
        clean = re.sub(r"\n{3,}", "\n\n", clean).strip()
        if len(clean) >= 500:
            docs.append((title, clean))
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return docs


def _text_documents(path: Path) -> list[tuple[str, str]]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise SolError(f"no .txt files under {path}")
        return [(str(f.relative_to(path)), f.read_text(errors="replace")) for f in files]
    text = path.read_text(errors="replace")
    parts = re.split(r"\n(?= = [^=].* = \n)", text)  # WikiText-style top-level headings
    if len(parts) < 3:
        parts = re.split(r"\n{3,}", text)
    return [(f"{path.name}#{i}", p.strip()) for i, p in enumerate(parts) if p.strip()]


def _hf_documents(spec: str, split: str) -> list[tuple[str, str]]:
    import datasets

    name, _, config = spec.partition("/")
    hf_split = {"validation": "validation", "test": "test", "train": "train"}[split]
    try:
        ds = datasets.load_dataset(name, config or None, split=hf_split)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds
        raise SolError(f"cannot load HF dataset '{spec}' split {hf_split}: {str(e).splitlines()[0]}") from None
    text = "\n".join(ds["text"])
    return [(f"{spec}:{hf_split}", text)]


def documents(source: str, split: str) -> list[tuple[str, str]]:
    """(key, text) of the documents of one split of a source."""
    if split not in SPLITS:
        raise SolError(f"unknown split '{split}': use {', '.join(SPLITS)}")
    if source.startswith("hf:"):
        return _hf_documents(source[3:], split)
    if source == "enwiki":
        docs = _enwiki_documents()
    else:
        path = Path(source)
        if not path.exists():
            raise SolError(f"unknown data source '{source}': use enwiki, a .txt file, a folder of .txt files or hf:<dataset>")
        docs = _text_documents(path)
    return [d for d in docs if split_of(d[0]) == split]


def blocks(source: str, split: str, tokenizer, block_len: int, max_blocks: int | None = None,
           stride: int | None = None) -> np.ndarray:
    """Token blocks [N, block_len] (int64) cut from each document of a split, never straddling documents.

    Blocks are consecutive within a document (``stride`` = block_len by default). Cached under $SOL_CACHE/blocks.
    """
    stride = stride or block_len
    tok_id = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    key = hashlib.sha1(json.dumps([source, split, tok_id, len(tokenizer), block_len, stride]).encode()).hexdigest()[:16]
    path = cache_dir() / "blocks" / f"{split}-{key}.npy"
    if path.is_file():
        arr = np.load(path)
    else:
        out = []
        for _, text in documents(source, split):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids) - block_len + 1, stride):
                out.append(ids[start:start + block_len])
        if not out:
            raise SolError(f"split '{split}' of '{source}' has no document of {block_len} tokens")
        arr = np.asarray(out, dtype=np.int64)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
    return arr[:max_blocks] if max_blocks else arr


def describe(source: str) -> dict:
    """Document counts per split (for provenance)."""
    return {s: len(documents(source, s)) for s in SPLITS} | {"source": source, "cache": os.fspath(cache_dir())}
