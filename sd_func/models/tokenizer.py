"""CLIP byte-level BPE tokenization (Radford et al. 2021) through transformers' CLIPTokenizer.

`load(spec)` gives a CLIPTokenizer from a local folder (vocab.json + merges.txt, or a
diffusers pipeline folder with a tokenizer/ subfolder), a hub id, or "builtin:shapes": a
small CLIP-format vocabulary shipped in sd_func/models/tokenizers/shapes/ (1000 entries: the
512 byte tokens, whole-word tokens for the synthetic-shapes prompts and common English
words, <|startoftext|>, <|endoftext|>), made by `build`. Regenerate it with
  python -m sd_func.models.tokenizer
`encode` pads to max_length exactly as diffusers' StableDiffusionPipeline does.
"""

import functools
import json
import os
import re
import socket
import urllib.parse

import torch
import transformers

from sd_func.errors import MissingFileError, UserError

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizers")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"  # CLIP marks the last symbol of a word

# Words of the synthetic shapes prompts first ("a red circle on a blue background"), then
# common English words; `build` keeps words in this order while the vocabulary has room.
SHAPES_WORDS = (
    "a an the on of in background red green blue yellow white black circle square triangle "
    "and with at small large big tiny left right top bottom center middle corner above below "
    "orange purple pink brown gray grey cyan magenta dark light bright pale "
    "star rectangle ellipse oval hexagon cross ring dot line shape shapes object "
    "two three one four many some is it to be or as by for no not this that "
    "photo picture image drawing painting art style high quality detailed simple plain "
    "cat dog man woman person car house tree sky sun water sea city street room "
    "day night new old good best very much more most all each other like over under "
    "up down out from into next near far front back side between around inside outside "
    "colored color solid filled empty round flat thin thick "
    "five six seven eight nine ten has have are was were will can what which who where when how "
    "my your his her their our boy girl child people cats dogs men women table chair book window "
    "door wall floor flower grass forest mountain river beach wood metal glass stone paper "
    "half full part shadow pattern texture rendering realistic blurry sharp clean "
    "so if we he me do go up us am"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (256 entries)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges lowest rank first (leftmost on ties), as the tokenizers library does."""
    s = list(symbols)
    while len(s) > 1:
        cands = [(ranks[p], i) for i, p in enumerate(zip(s, s[1:])) if p in ranks]
        if not cands:
            break
        _, i = min(cands)
        s[i:i + 2] = [s[i] + s[i + 1]]
    return s


def build(words, out_dir: str, vocab_size: int = 1000) -> list[str]:
    """Write a CLIP-format tokenizer folder in which every kept word is one token.

    The vocabulary follows CLIP's layout: 256 byte symbols, the same with "</w>", one
    entry per merge, then <|startoftext|> and <|endoftext|> (the last two ids). Words
    (lowercase a-z) are added in order; each gets the merges that join its current
    segmentation left to right, appended after all earlier merges so that no earlier word
    changes. A word that would overflow vocab_size is skipped. Returns the kept words.
    """
    base = list(_bytes_to_unicode().values())
    vocab = base + [c + EOW for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    kept = []
    for w in words:
        if not re.fullmatch(r"[a-z]+", w):
            raise ValueError(f"tokenizer.build: word {w!r} must be lowercase a-z")
        if w in kept:
            continue
        seg = _bpe([*w[:-1], w[-1] + EOW], ranks)
        new = []
        while len(seg) > 1:
            pair = (seg[0], seg[1])
            new.append(pair)
            seg = [seg[0] + seg[1], *seg[2:]]
        results = {a + b for a, b in new}
        if len(vocab) + len(new) + 2 > vocab_size or results & set(vocab):
            continue
        trial = {**ranks, **{p: len(merges) + i for i, p in enumerate(new)}}
        if _bpe([*w[:-1], w[-1] + EOW], trial) != [w + EOW]:
            continue
        ranks = trial
        merges += new
        vocab += [a + b for a, b in new]
        kept.append(w)
    vocab += [BOS, EOS]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False, indent=0)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="CLIPTokenizer", model_max_length=77, bos_token=BOS,
                       eos_token=EOS, unk_token=EOS, pad_token=EOS, do_lower_case=True), f, indent=2)
    with open(os.path.join(out_dir, "words.txt"), "w") as f:
        f.write("\n".join(kept) + "\n")
    return kept


def _folder(path: str) -> str | None:
    """The folder holding vocab.json + merges.txt (or transformers 5's single tokenizer.json):
    path itself or its tokenizer/ subfolder."""
    for d in (path, os.path.join(path, "tokenizer")):
        if all(os.path.isfile(os.path.join(d, f)) for f in ("vocab.json", "merges.txt")):
            return d
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return d
    return None


@functools.lru_cache(maxsize=8)
def load(spec: str) -> transformers.CLIPTokenizer:
    """A CLIPTokenizer from "builtin:NAME", a local folder, or a hub id ("org/repo[/subfolder]")."""
    hint = ("A CompVis checkpoint file carries no tokenizer: pass a local tokenizer folder "
            "(vocab.json + merges.txt) via --config.text_encoder.tokenizer=PATH")
    if not spec:
        raise UserError(f"tokenizer: cfg.text_encoder.tokenizer is empty. {hint}")
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        d = _folder(os.path.join(BUILTIN_DIR, name))
        if d is None:
            raise UserError(f"tokenizer {spec!r}: no builtin tokenizer {name!r}; have "
                             f"{sorted(os.listdir(BUILTIN_DIR))}")
        return transformers.CLIPTokenizer.from_pretrained(d)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        d = _folder(path)
        if d is None:
            raise MissingFileError(f"tokenizer {spec!r}: folder has no vocab.json + merges.txt "
                                    f"(nor a tokenizer/ subfolder with them). {hint}")
        return transformers.CLIPTokenizer.from_pretrained(d)
    parts = spec.strip("/").split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:]) or None
    missing = (f"tokenizer {spec!r}: not a local folder and no CLIP vocabulary could be fetched "
               f"from the hub. {hint}")
    # The local HF cache first; the network only when the hub answers at all (without a
    # network huggingface_hub retries each file for minutes before failing).
    for local_only in (True, False):
        if not local_only and not _hub_reachable():
            break
        try:
            tok = transformers.CLIPTokenizer.from_pretrained(repo, subfolder=sub, local_files_only=local_only)
        except Exception as e:  # unknown repo, no tokenizer files: one clear message
            if local_only:
                continue
            raise MissingFileError(f"{missing} ({type(e).__name__}: {e})") from e
        # transformers >= 5 returns an empty tokenizer (2 special tokens) when no vocab file is found.
        if len(tok.get_vocab()) >= 512:
            return tok
    raise MissingFileError(missing)


def _hub_reachable(timeout: float = 5.0) -> bool:
    """False when offline mode is set or the hub endpoint does not accept a connection."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let huggingface_hub try
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def max_length(tok, cfg_te) -> int:
    """Token ids per prompt: the tokenizer's model_max_length (77 for CLIP), capped by the
    text encoder's max_position_embeddings (configs/shapes.py uses 16)."""
    return min(int(tok.model_max_length), int(cfg_te.max_position_embeddings))


def encode(tok, prompts, max_length: int = 77) -> torch.Tensor:
    """Prompts -> LongTensor [B, max_length]: <|startoftext|> ids <|endoftext|> then the
    tokenizer's pad token, truncated to max_length (diffusers: padding="max_length")."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    out = tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out.input_ids


if __name__ == "__main__":
    kept = build(SHAPES_WORDS, os.path.join(BUILTIN_DIR, "shapes"))
    print(f"wrote {os.path.join(BUILTIN_DIR, 'shapes')}: {len(kept)} words")
