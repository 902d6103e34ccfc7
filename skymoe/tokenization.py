"""A small byte-level BPE tokenizer for demo/test models, with single-token box coordinates.

Real checkpoints use LLaVA's Llama tokenizer (copied by :func:`skymoe.conversion.convert_llava`);
this one is for models trained from scratch (tests, the demo checkpoint). Its vocabulary holds
the GeoChat grid coordinates ``<0>`` .. ``<100>``, ``<p>``/``</p>`` and the digits ``0``-``9`` as
single tokens, so a box ``{<89><47><97><55>|<58>}`` is 8 tokens and a count is one token per digit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "GRID_TOKENS", "build_tokenizer"]

logger = logging.getLogger(__name__)

#: Special tokens, in id order: bos, eos, unk, pad, image.
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>", "<image>")
#: The 0-100 box grid, one token per value.
GRID_TOKENS = tuple(f"<{i}>" for i in range(101))
_PHRASE_TOKENS = ("<p>", "</p>")
_DIGITS = tuple(str(d) for d in range(10))


def build_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and add the SkyMoE tokens.

    Ids 0-4 are ``<s> </s> <unk> <pad> <image>``; the trained BPE vocabulary follows (at most
    ``vocab_size`` entries including the specials and the 256 byte symbols), then the added
    tokens ``<0>``..``<100>``, ``<p>``, ``</p>``, ``0``..``9``. Encoding prepends ``<s>``;
    padding is on the left (batched generation).

    Args:
        texts: Training corpus (a few hundred short strings are enough for tests).
        vocab_size: BPE vocabulary size before the added tokens; at least 261 (specials + bytes).

    Returns:
        The tokenizer; ``len(tokenizer)`` is the model vocabulary it needs.

    Raises:
        ValueError: If ``vocab_size`` cannot hold the specials and the byte alphabet.
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum}")
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_tokens(list(GRID_TOKENS + _PHRASE_TOKENS + _DIGITS))
    logger.debug("built a %d-token BPE tokenizer", len(tokenizer))
    return tokenizer
