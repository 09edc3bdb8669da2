"""Text encoders and tokenizers built from scratch for the random twins: no vocabulary file is downloaded.

A CLIP BPE tokenizer with the byte alphabet and no merges, and a Unigram T5 tokenizer with the lower-case
letters: the empty prompt the backbones embed encodes exactly as with the real vocabularies ([bos, eos] /
[eos]), and every other string still tokenizes. :func:`tiny_clip` pairs the CLIP one with a two-layer
random CLIP text model, as every twin family uses it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tadm.testing.twins.twin_weights import seeded

TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode table; the first 256 vocab entries."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def tiny_tokenizer(pad_token: str | None = None) -> Any:
    """A CLIP BPE tokenizer with the byte alphabet, no merges and the two CLIP specials (514 ids).

    transformers 5's ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently builds an empty
    tokenizer, so the files are written to a folder and loaded with ``from_pretrained``.
    """
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    kwargs: dict[str, Any] = {"model_max_length": 77}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    with tempfile.TemporaryDirectory(prefix="tadm-tiny-tok-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(tmp, **kwargs)
    ids = tok("").input_ids
    if len(tok) != len(vocab) or ids != [vocab["<|startoftext|>"], vocab["<|endoftext|>"]]:
        raise RuntimeError(f"tiny CLIP tokenizer came out broken: {len(tok)} tokens, '' -> {ids}")
    return tok


def tiny_t5_tokenizer() -> Any:
    """A Unigram T5 tokenizer (pad 0, eos 1, unk 2, lower-case letters, the word marker): 30 ids.

    Built from a ``tokenizers`` object, so no sentencepiece model is needed; "" encodes to [eos] as T5's.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(c), -1.0) for c in range(97, 123)]
    vocab.append(("\u2581", -1.0))
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )
    with tempfile.TemporaryDirectory(prefix="tadm-tiny-t5-") as tmp:  # saved and loaded, as a folder gives
        tok.save_pretrained(tmp)
        tok = T5TokenizerFast.from_pretrained(tmp, model_max_length=512)
    if tok("").input_ids != [1]:
        raise RuntimeError(f"tiny T5 tokenizer came out broken: '' -> {tok('').input_ids}")
    return tok


def tiny_clip(
    seed: int, encoder_class: Any, hidden_act: str, pad_token: str | None = None, **config: Any
) -> Any:
    """(a random :data:`TINY_TEXT` CLIP text model of ``encoder_class``, seeded with ``seed``; its tokenizer).

    SD 1.x uses OpenAI CLIP (quick_gelu, pad = eos); SD 2.x and the second SDXL encoder OpenCLIP (gelu,
    pad ``!``). ``config`` adds to the CLIP config (e.g. ``projection_dim``).
    """
    from transformers import CLIPTextConfig

    tok = tiny_tokenizer(pad_token=pad_token)
    specials = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = CLIPTextConfig(**TINY_TEXT, **specials, hidden_act=hidden_act, **config)
    return seeded(seed, lambda: encoder_class(cfg)), tok
