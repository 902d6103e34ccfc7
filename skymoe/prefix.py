"""Image-prefix reuse: encode a tile once, answer many questions about it.

Every SkyMoE prompt starts with the same tokens for a given tile: the system line,
``USER: `` and the image tokens (1296 at 504 px). :class:`TilePrefix` runs the vision tower and
the language model over that prefix once, keeps its KV cache, and answers each further
question by prefilling only the text after the image (``"\\n{question} ASSISTANT:"``, or the
previous turns of a chat followed by the new question) and decoding. The tokens are the
same as a fresh :func:`skymoe.generate` on the whole prompt (tests/test_fast_inference.py).

Several tiles can share one :class:`TilePrefix` (a batch of tiles, one KV row each), and
several questions can be asked of one tile at once (its KV row is repeated). A question asked
alone (one row) also keeps the KV of its whole conversation (prefix, text, answer): the next
one-row question on that tile reuses it up to the first token where its prompt differs, so a
chat turn prefills only the new question, not the earlier turns again. Rows whose text
after the prefix differs in length are padded between the prefix and the text (the
attention mask hides the padding; positions follow the mask), so every row sees exactly
the positions and keys of its own unpadded prompt.

With ``router_mode="task"`` the router adds a per-task bias to every token, image tokens
included, so the prefix is encoded once per task (lazily, on the first question of that task).

A model trained with the image after the question (``config.image_after_question``) shares only
the system line and ``USER:`` between questions: the image tokens follow, and depend on, each
question. Its prefix is that text; every question's prefill holds the question and the image
tokens, and the vision tower runs again on each row's tile. Chat turns still reuse the KV of the
conversation so far, image included.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from .generation import Generation, generations_from_scores, inference_path, task_ids_for_prompts
from .moe import moe_blocks
from .modeling import SkyMoEForConditionalGeneration
from .processing import SkyMoEProcessor
from .prompts import IMAGE_TOKEN, render_conversation

__all__ = ["TilePrefix"]

logger = logging.getLogger(__name__)

#: One ``(keys, values)`` pair per decoder layer, each ``(tiles, kv_heads, prefix_len, head_dim)``.
LayerKV = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True)
class _Turn:
    """The KV cache of the last one-row ask: its task, tile, token ids ``(length,)`` and per-layer KV."""

    task: int
    tile: int
    ids: torch.Tensor
    kv: LayerKV


class TilePrefix:
    """The encoded image prefix of one or more tiles, reusable for any number of questions.

    Example (chat on one tile, counting several classes on a batch of tiles)::

        prefix = TilePrefix(model, processor, [tile])
        first = prefix.ask(build_prompt("caption"))[0]
        second = prefix.ask("Is there a runway?", history=[(build_prompt("caption"), first.text)])[0]

        prefix = TilePrefix(model, processor, tiles)  # 8 tiles
        per_class = {c: prefix.ask(build_prompt("count", c)) for c in ("ship", "storage tank")}

    Not thread-safe (like the model itself).

    Attributes:
        model: The SkyMoE.
        processor: Its processor.
        num_tiles: Tiles in the prefix.
        prefix_ids: ``(prefix_len,)`` int64 token ids of the prefix (BOS, system, ``USER: ``, image
            tokens; without the image tokens for a model that puts the image after the question).
        fast: Fast or plain path (see :mod:`skymoe.generation`), ``None`` = the model's setting.
    """

    def __init__(
        self,
        model: SkyMoEForConditionalGeneration,
        processor: SkyMoEProcessor,
        images: Sequence[Image.Image | np.ndarray],
        *,
        fast: bool | None = None,
    ):
        """Preprocess the tiles (the language-model work happens on the first question).

        Args:
            model: A SkyMoE in eval mode.
            processor: Its processor.
            images: One or more tiles (RGB PIL images or uint8 ``(H, W, 3)`` arrays).
            fast: Fast or plain path; ``None`` = :func:`skymoe.generation.fast_inference_enabled`.

        Raises:
            ValueError: No image, or a tokenizer that merges the image tokens with their neighbours.
        """
        if isinstance(images, (Image.Image, np.ndarray)) or len(images) == 0:
            raise ValueError("TilePrefix needs a non-empty list of tiles (PIL images or uint8 arrays)")
        self.model, self.processor, self.fast = model, processor, fast
        self.num_tiles = len(images)
        text = render_conversation([("", None)])  # system, "USER: <image>\n ASSISTANT:"
        inputs = processor(images=list(images), text=[text] * self.num_tiles, return_tensors="pt")
        ids = inputs["input_ids"][0]  # (len,)
        image_positions = torch.nonzero(ids == model.config.image_token_index).flatten()
        if image_positions.numel() == 0:
            raise ValueError(f"the processor produced no image token (id {model.config.image_token_index})")
        self.num_image_tokens = int(image_positions.numel())
        if self.image_after_question:  # the text up to "USER:" (every prompt is checked to start with it)
            shared = text[: text.index(IMAGE_TOKEN)].rstrip()
            self.prefix_ids = torch.tensor(processor.tokenizer(shared)["input_ids"], dtype=torch.long)
        else:
            self.prefix_ids = ids[: int(image_positions[-1]) + 1].clone()  # up to the last image token
        self._pixel_values = inputs["pixel_values"].to(model.device)
        self._moe_blocks = moe_blocks(model)  # walked once, not per question
        self._kv: dict[int, LayerKV] = {}  # task id (-1 = none) -> prefix KV of every tile
        self._last_turn: _Turn | None = None  # KV of the last one-row ask (prefix + text + answer)

    @property
    def image_after_question(self) -> bool:
        """The model reads the image after the question (its config), so the prefix holds no image."""
        return bool(self.model.config.image_after_question)

    @property
    def prefix_length(self) -> int:
        """Tokens in the prefix (BOS + system + ``USER: `` + image tokens unless the question comes first)."""
        return int(self.prefix_ids.numel())

    def ask(
        self,
        prompts: str | Sequence[str],
        history: Sequence[tuple[str, str]] = (),
        max_new_tokens: int = 64,
        do_sample: bool = False,
    ) -> list[Generation]:
        """Answer questions about the prefix's tiles, prefilling only the text after the image.

        Args:
            prompts: A user message (as from :func:`skymoe.build_prompt`) asked of every tile;
                or one message per tile; or, for a one-tile prefix, any number of messages
                asked of that tile (one batched decode).
            history: Earlier ``(user, assistant)`` turns of the chat (the same for every row);
                they are part of the text after the prefix.
            max_new_tokens: Generation budget per answer (>= 1).
            do_sample: Sample instead of greedy decoding.

        Returns:
            One :class:`Generation` per row (per tile, or per message for a one-tile prefix).

        Raises:
            ValueError: A prompt count that matches neither the tiles nor a one-tile prefix,
                or a bad ``max_new_tokens``.
        """
        prompts, tile_of_row = self._rows(prompts)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        texts = [render_conversation([*history, (prompt, None)], image_after_question=self.image_after_question)
                 for prompt in prompts]
        input_ids, attention_mask = self._row_inputs(texts)
        task_ids = task_ids_for_prompts(prompts)  # (rows,)
        return self._decode(input_ids, attention_mask, task_ids, tile_of_row, max_new_tokens, do_sample)

    def _rows(self, prompts: str | Sequence[str]) -> tuple[list[str], list[int]]:
        """The row prompts and the tile of each row."""
        if isinstance(prompts, str):
            return [prompts] * self.num_tiles, list(range(self.num_tiles))
        prompts = list(prompts)
        if self.num_tiles == 1 and prompts:
            return prompts, [0] * len(prompts)
        if len(prompts) != self.num_tiles:
            raise ValueError(
                f"got {len(prompts)} prompts for a prefix of {self.num_tiles} tiles: pass one prompt (asked of every "
                "tile), one per tile, or build a one-tile prefix to ask several questions of one tile"
            )
        return prompts, list(range(self.num_tiles))

    def _row_inputs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``(rows, prefix_len + longest_suffix)``, padded after the prefix."""
        tokenizer = self.processor.tokenizer
        rows = self._tokenized(texts)
        length = self.prefix_length
        for text, ids in zip(texts, rows):
            if ids.numel() <= length or not torch.equal(ids[:length], self.prefix_ids):
                raise ValueError(
                    f"the tokenized prompt {text[:80]!r}... does not start with the cached image prefix: the "
                    "tokenizer merges tokens across the image boundary; use skymoe.generate for this prompt"
                )
        suffixes = [ids[length:] for ids in rows]
        width = max(s.numel() for s in suffixes)
        input_ids = torch.full((len(rows), length + width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        input_ids[:, :length] = self.prefix_ids
        attention_mask[:, :length] = 1
        for row, suffix in enumerate(suffixes):
            input_ids[row, length + width - suffix.numel() :] = suffix
            attention_mask[row, length + width - suffix.numel() :] = 1
        return input_ids, attention_mask

    def _tokenized(self, texts: list[str]) -> list[torch.Tensor]:
        """Token ids of each text with its one image token expanded to the tile's image tokens.

        The image token is an added token, which the tokenizer never merges with its
        neighbours, so tokenizing the text once with a single image token and repeating that
        id gives the ids of the expanded text (what the processor tokenizes) for a fraction of
        the work; a text without exactly one image token is tokenized expanded.
        """
        tokenizer, image_id = self.processor.tokenizer, self.model.config.image_token_index
        rows = []
        for text, ids in zip(texts, tokenizer(texts)["input_ids"]):
            ids = torch.tensor(ids, dtype=torch.long)
            at = torch.nonzero(ids == image_id).flatten()
            if at.numel() == 1 and text.count(IMAGE_TOKEN) == 1:
                ids = torch.cat([ids[: int(at)], ids[at].repeat(self.num_image_tokens), ids[int(at) + 1 :]])
            else:
                expanded = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_image_tokens)
                ids = torch.tensor(tokenizer(expanded)["input_ids"], dtype=torch.long)
            rows.append(ids)
        return rows

    @torch.inference_mode()
    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor,
                tile_of_row: list[int], max_new_tokens: int, do_sample: bool) -> list[Generation]:
        """Generate from a cache holding each row's tile prefix (only the text after it is prefilled)."""
        model, tokenizer = self.model, self.processor.tokenizer
        task_mode = model.config.router_mode == "task"
        task_of_row = task_ids.tolist() if task_mode else [-1] * len(tile_of_row)
        extra = {"task_ids": task_ids.to(model.device)} if task_mode else {}
        with inference_path(model, self.fast, self._moe_blocks):
            cache = self._turn_cache(input_ids, task_of_row, tile_of_row) or self._row_cache(task_of_row, tile_of_row)
            input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
            # with the question first, the image tokens are in the text to prefill: the rows' tiles go with it
            uncached = input_ids[:, cache.get_seq_length():]
            pixels = self._pixel_values[tile_of_row] if bool((uncached == model.config.image_token_index).any()) else None
            if do_sample:
                out = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, cache=cache, pixel_values=pixels, **extra,
                    max_new_tokens=max_new_tokens, do_sample=True, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, output_logits=True, return_dict_in_generate=True,
                )
                new_tokens, logits = out.sequences[:, input_ids.shape[1] :], out.logits  # (rows, steps)
            else:
                new_tokens, logits = self._greedy(input_ids, attention_mask, cache, extra, max_new_tokens, pixels)
        if len(tile_of_row) == 1:  # a chat turn: keep its KV for the next turn on this tile
            length = cache.get_seq_length()
            ids = torch.cat([input_ids[0], new_tokens[0]])[:length].cpu()
            kv = tuple((layer.keys, layer.values) for layer in cache.layers)
            self._last_turn = _Turn(task_of_row[0], tile_of_row[0], ids, kv)
        return generations_from_scores(tokenizer, new_tokens, logits)

    def _greedy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache, extra: dict,
                max_new_tokens: int, pixel_values: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Greedy decoding on the language model and LM head directly (what transformers' greedy ``generate``
        computes, without its per-call and per-step overhead): feeds the uncached tokens, then one token per step.
        ``pixel_values`` ``(rows, 3, H, W)``: each row's tile, where the uncached tokens hold its image
        tokens (the first prefill goes through the vision tower and projector then); else ``None``.

        Returns:
            ``(rows, steps)`` generated ids (pad after a row's EOS, as ``generate``) and the raw
            ``(rows, vocab)`` logits of each step.
        """
        model, tokenizer = self.model, self.processor.tokenizer
        text_model = model.model.language_model
        past = cache.get_seq_length()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (rows, new)
        feed, mask = input_ids[:, past:], attention_mask
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tokens, logits = [], []
        for step in range(max_new_tokens):
            decoder = text_model if step or pixel_values is None else partial(model.model, pixel_values=pixel_values)
            hidden = decoder(input_ids=feed, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, **extra).last_hidden_state[:, -1]  # (rows, D)
            step_logits = model.lm_head(hidden)  # (rows, vocab)
            chosen = torch.where(finished, pad, step_logits.argmax(-1))  # (rows,)
            tokens.append(chosen)
            logits.append(step_logits)
            finished |= chosen == tokenizer.eos_token_id
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            feed, positions = chosen.unsqueeze(1), positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return torch.stack(tokens, dim=1), logits

    def _turn_cache(self, input_ids: torch.Tensor, task_of_row: list[int], tile_of_row: list[int]) -> DynamicCache | None:
        """For a one-row ask on the tile (and task) of the previous one-row ask: a cache holding the
        previous conversation's KV up to the first token where the new prompt differs from it
        (the earlier turns and answers), so only the new text is prefilled; else ``None``."""
        turn = self._last_turn
        if turn is None or len(tile_of_row) != 1 or (turn.task, turn.tile) != (task_of_row[0], tile_of_row[0]):
            return None
        ids = input_ids[0]
        span = min(turn.ids.numel(), ids.numel() - 1)  # at least one new token must be fed
        differs = torch.nonzero(turn.ids[:span] != ids[:span]).flatten()
        common = int(differs[0]) if differs.numel() else span
        if common <= self.prefix_length:
            return None
        return DynamicCache(ddp_cache_data=[(k[:, :, :common], v[:, :, :common]) for k, v in turn.kv])

    def _row_cache(self, task_of_row: list[int], tile_of_row: list[int]) -> DynamicCache:
        """A fresh cache with row ``r`` = the prefix KV of tile ``tile_of_row[r]`` under task ``task_of_row[r]``."""
        per_task = {task: self._prefix_kv(task) for task in sorted(set(task_of_row))}
        if len(per_task) == 1 and tile_of_row == list(range(self.num_tiles)):
            layers = per_task[task_of_row[0]]  # every tile once, in order: no gather needed
        else:  # copy each row's tile (under its task) out of the stored prefix
            layers = [
                tuple(torch.stack([per_task[task][layer][part][tile] for task, tile in zip(task_of_row, tile_of_row)])
                      for part in (0, 1))
                for layer in range(len(per_task[task_of_row[0]]))
            ]
        return DynamicCache(ddp_cache_data=layers)  # updates concatenate: the stored prefix is never written

    def _prefix_kv(self, task: int) -> LayerKV:
        """The prefix KV of every tile under ``task`` (-1 = no task bias), computed once."""
        if task not in self._kv:
            model = self.model
            # with the question first the prefix holds no image, so it is the same for every tile: encode one row
            rows, pixels = (1, None) if self.image_after_question else (self.num_tiles, self._pixel_values)
            ids = self.prefix_ids.unsqueeze(0).expand(rows, -1).to(model.device)  # (rows, prefix_len)
            extra = {}
            if model.config.router_mode == "task":
                extra["task_ids"] = torch.full((rows,), task, dtype=torch.long, device=model.device)
            cache = DynamicCache()
            model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                  cache=cache, use_cache=True, logits_to_keep=1, **extra)
            # views of the one row for every tile (the stored prefix is never written, see _row_cache)
            self._kv[task] = tuple((layer.keys.expand(self.num_tiles, -1, -1, -1),
                                    layer.values.expand(self.num_tiles, -1, -1, -1)) for layer in cache.layers)
            logger.debug("encoded the image prefix of %d tiles (%d tokens, task %d)", self.num_tiles,
                         self.prefix_length, task)
        return self._kv[task]
