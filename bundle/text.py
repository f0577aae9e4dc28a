"""Text side of the AlignerVLM: prompt vocabulary, tokenizer and BERT text-encoder construction, all offline.

Three ways to get a text encoder (``build_text_encoder``):

* ``"random-small"`` / ``"random-base"``: a randomly initialised ``BertModel`` built from a ``BertConfig`` with a
  WordPiece vocabulary generated from the prompts (no file, no download);
* a local directory written by ``save_pretrained`` (e.g. a downloaded Med-KEBERT);
* a Hugging Face hub id (``"xmcmic/Med-KEBERT"``) that must already be in the local HF cache.

Nothing here ever touches the network: every ``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Iterable, Sequence

import torch
from tokenizers import normalizers, pre_tokenizers
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizer

from bundle.errors import MissingWeightsError, fetch_target, looks_like_hub_id

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Sizes of the offline, randomly initialised text encoders. "random-base" is BERT-base / Med-KEBERT sized
# (768-d, 12 layers, 12 heads); only its vocabulary is smaller (generated from the prompts).
RANDOM_TEXT_CONFIGS = {
    "random-small": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512},
    "random-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}

MED_KEBERT_ID = "xmcmic/Med-KEBERT"


# Folder names (lower case) a text encoder is known under on the hub, to suggest what to fetch into a missing folder.
KNOWN_TEXT_ENCODERS = {"med-kebert": MED_KEBERT_ID}


class TextEncoderNotFoundError(MissingWeightsError):
    """A pretrained text encoder was requested but is not available locally (nothing is ever downloaded).
    A :class:`bundle.errors.MissingWeightsError`, hence a ``FileNotFoundError``."""


def _basic_words(texts: Iterable[str]) -> list[str]:
    """Words and punctuation marks exactly as BERT's normaliser (uncased) and pre-tokenizer split them."""
    norm = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True, strip_accents=None)
    pre = pre_tokenizers.BertPreTokenizer()
    return [w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))]


def build_prompt_vocab(prompts: Iterable[str]) -> dict[str, int]:
    """WordPiece vocabulary covering ``prompts``: specials, every prompt word, then single characters as word
    starts and ``##`` continuations (so that any lower-case ASCII text still tokenizes without ``[UNK]``)."""
    prompts = list(prompts)
    tokens: list[str] = list(SPECIAL_TOKENS)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    for w in _basic_words(prompts):
        if w not in tokens:
            tokens.append(w)
    # Characters of the prompts that are not ASCII (e.g. accented letters kept by lower-casing) also become pieces.
    extra = sorted({ch for p in prompts for ch in p.lower() if not ch.isspace() and ch not in chars})
    for ch in list(chars) + extra:
        for piece in (ch, "##" + ch):
            if piece not in tokens:
                tokens.append(piece)
    return {t: i for i, t in enumerate(tokens)}


def build_prompt_tokenizer(prompts: Iterable[str]) -> BertTokenizer:
    """An uncased BERT WordPiece tokenizer whose vocabulary is generated from ``prompts`` (built in memory)."""
    return BertTokenizer(vocab=build_prompt_vocab(prompts), do_lower_case=True)


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int = 64, check_unk: bool = True):
    """Tokenize the class prompts (padded to the longest). Returns ``(input_ids, attention_mask)`` as long tensors.

    Raises ValueError when a prompt contains ``[UNK]`` pieces and ``check_unk`` is set: the text encoder would then
    see the same unknown token for different words, and class queries could collapse.
    """
    enc = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    unk = tokenizer.unk_token_id
    if check_unk and unk is not None and bool((ids == unk).any()):
        bad = [p for p, row in zip(prompts, ids, strict=True) if bool((row == unk).any())]
        raise ValueError(
            f"prompts {bad} contain words the text encoder's vocabulary does not cover ([UNK]); "
            "reword the prompts (networks prompts=...) or use a text encoder whose vocabulary covers them"
        )
    return ids.long(), mask.long()


def _not_found(spec: str, reason: str = "") -> TextEncoderNotFoundError:
    repo, local_dir = fetch_target(spec, KNOWN_TEXT_ENCODERS, MED_KEBERT_ID)
    what = "Med-KEBERT" if repo == MED_KEBERT_ID else "text encoder"
    hint = (
        "A folder must hold what BertModel.save_pretrained and the tokenizer write (config.json, model.safetensors or "
        "pytorch_model.bin, vocab.txt or tokenizer.json); HF_HOME or HF_HUB_CACHE select another cache; "
        "text_encoder='random-small' or 'random-base' (or text_fallback) builds a random encoder offline instead"
    )
    return TextEncoderNotFoundError(what, spec, "text_encoder", repo, local_dir, reason, hint)


def _load_pretrained(spec: str, add_pooling_layer: bool = True):
    """Tokenizer + BertModel from a local directory or a cached hub id, never from the network."""
    path = os.path.expanduser(spec)
    if not looks_like_hub_id(spec) and not os.path.isdir(path):
        raise _not_found(spec)
    if not os.path.exists(path):
        path = spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=add_pooling_layer)
    except (OSError, ValueError) as e:  # OSError: missing files / not in cache; ValueError: offline-mode refusals
        # An existing folder that does not load says why (its first line); a hub id is simply not in the cache.
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}" if os.path.exists(path) else ""
        raise _not_found(spec, reason) from e
    return tokenizer, model


def build_text_encoder(
    spec: str,
    prompts: Sequence[str],
    text_hidden: int | None = None,
    text_layers: int | None = None,
    text_heads: int | None = None,
    text_intermediate: int | None = None,
    fallback: str | None = None,
    add_pooling_layer: bool = True,
):
    """Return ``(tokenizer, BertModel, source)``; ``source`` says what was actually built (for logging).

    ``spec``: ``"random-small"``, ``"random-base"``, a local directory, or a hub id in the local HF cache.
    ``text_*`` override the sizes of a random encoder (ignored for pretrained ones, whose config rules).
    ``fallback``: a random spec to build (with a warning) when a pretrained ``spec`` is not available locally;
    ``None`` raises ``TextEncoderNotFoundError`` with download instructions instead.
    ``add_pooling_layer``: False drops BERT's pooler (unused, and a DDP unused-parameter error when trainable,
    unless the pooling is "pooler").
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"text_encoder must be 'random-small', 'random-base', a directory or a hub id, got {spec!r}")
    if spec in RANDOM_TEXT_CONFIGS:
        cfg = dict(RANDOM_TEXT_CONFIGS[spec])
        for key, val in (
            ("hidden_size", text_hidden),
            ("num_hidden_layers", text_layers),
            ("num_attention_heads", text_heads),
            ("intermediate_size", text_intermediate),
        ):
            if val is not None:
                cfg[key] = int(val)
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ValueError(
                f"text_hidden={cfg['hidden_size']} must be divisible by text_heads={cfg['num_attention_heads']}"
            )
        tokenizer = build_prompt_tokenizer(prompts)
        config = BertConfig(vocab_size=len(tokenizer.get_vocab()), max_position_embeddings=128, **cfg)
        return tokenizer, BertModel(config, add_pooling_layer=add_pooling_layer), spec
    if spec.startswith("random-"):
        raise ValueError(f"unknown random text encoder {spec!r}; choose one of {sorted(RANDOM_TEXT_CONFIGS)}")
    try:
        tokenizer, model = _load_pretrained(spec, add_pooling_layer)
    except TextEncoderNotFoundError as e:
        if fallback is None:
            raise
        logger.warning("%s Falling back to a randomly initialised %r text encoder.", e, fallback)
        tok, mdl, src = build_text_encoder(
            fallback, prompts, text_hidden, text_layers, text_heads, text_intermediate, None, add_pooling_layer
        )
        return tok, mdl, f"{src} (fallback: {spec} not found locally)"
    return tokenizer, model, spec


def pool_text(output, attention_mask: torch.Tensor, pooling: str = "pooler") -> torch.Tensor:
    """One vector per prompt from a BertModel output: ``"pooler"`` (KAD: pooler_output = tanh(W h_CLS)),
    ``"cls"`` (h_CLS) or ``"mean"`` (mean of the last hidden states over the real tokens)."""
    if pooling == "pooler":
        if output.pooler_output is None:
            raise ValueError("text_pooling='pooler' needs a BertModel with its pooling layer; use 'cls' or 'mean'")
        return output.pooler_output
    h = output.last_hidden_state
    if pooling == "cls":
        return h[:, 0]
    if pooling == "mean":
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"text_pooling={pooling!r}; choose 'pooler', 'cls' or 'mean'")


@torch.no_grad()
def encode_prompts(
    text_encoder: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "pooler"
) -> torch.Tensor:
    """Prompt features (C, hidden) in eval mode (no dropout), without a graph: the frozen-encoder cache."""
    was_training = text_encoder.training
    text_encoder.eval()
    try:
        out = text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return pool_text(out, attention_mask, pooling).detach()
    finally:
        text_encoder.train(was_training)
