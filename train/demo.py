"""Train the shipped demo checkpoint from scratch on synthetic scenes (issue 5, item 5).

``python -m train.demo --out assets/skymoe-demo [--budget-minutes 90] [--seed 0]`` runs the
whole recipe on CPU (or one GPU) within the time budget; ``--config train/configs/demo_gpu.yaml``
sizes it for one GPU (more scenes, batches of 64, loader processes; 9 minutes):

1. **Data**: synthetic scenes (:mod:`train.synthetic`) on an easy-to-dense curriculum, CDA
   variants (:func:`train.cda.augment_image`) of a share of them, and instruction samples
   (:func:`train.instructions.make_samples`) packed into one multi-turn conversation per image
   (the image is encoded once, the loss covers every answer).
2. **Tokenizer**: :func:`skymoe.build_tokenizer` trained on the conversations (grid tokens
   ``<0>``..``<100>`` and digits are single tokens).
3. **Model**: a small SkyMoE from scratch (:func:`skymoe.tiny_config` with the demo widths):
   CLIP-architecture tower at 504 px with 28 px patches (18 x 18 = 324 image tokens), LLaVA
   2-layer MLP projector, small Llama; every Linear width a multiple of 64 (4-bit on CPU).
4. **Stage 0** (:mod:`train.vision_pretrain`): the tower and projector learn per-patch object
   centres, extents, boxes and colours and the scene class from the scenes' annotations, the
   stand-in for the pretrained CLIP the paper starts from.
5. **Stage "dense"**: all parameters trained with the LM loss on answer tokens
   (:func:`train.loop.train`) on the easier scenes.
6. **Stage II**: :func:`skymoe.upcycle` to E experts on every second layer, top-k, and
   fine-tuning of all parameters with ``LM + alpha * aux`` on all scenes.

   Both language-model stages can add the box-attention loss (:mod:`train.box_attention`,
   ``training.box_attention``), which teaches one head to look at the object whose box is
   being written.
7. The model is saved with ``save_pretrained`` (safetensors) plus the processor, a
   ``training_summary.json`` and a model card.

Each phase runs in chunks of the explicit loop (checkpoint, then resume), with a quick
held-out check (:func:`train.eval.score_results` on a validation benchmark whose seed is
``seed + 1``, never an evaluation seed) between chunks. The phase length in steps is planned
from a measured step time so that the whole run fits ``--budget-minutes``; when the machine
turns out slower than measured, a phase stops at the chunk boundary whose next chunk would
overrun its share of the budget.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import logging
import math
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

import skymoe
from skymoe.position_codes import sincos_codes
from skymoe.prompts import render_conversation
from train.box_attention import BoxAttentionLoss, BoxAttentionSettings, plus_box_attention, supervising
from train.cda import CdaOptions, augment_image
from train.config import ConfigError, LoopConfig, OptimConfig, load_config
from train.dataset import InstructionDataset, PaddingCollator, read_instruction_jsonl
from train.eval import SampleResult, group_queries, build_synthetic_benchmark, score_results
from train.instructions import InstructionSample, SampleOptions, make_samples, write_jsonl
from train.loop import bf16_autocast, has_bf16, seconds_per_call_after_prefetch, train
from train.stage1 import save_model_folder
from train.stage2 import set_trainable
from train.synthetic import generate_dataset
from train.synthetic.dataset import write_image
from train.vision_pretrain import CentreLoss, PatchVocabulary, pretrain_vision, word_directions
from train.word_match import init_word_match_head, patch_directions

__all__ = [
    "DemoModel",
    "TurnQuota",
    "DemoData",
    "DemoTraining",
    "DemoConfig",
    "PhaseReport",
    "build_training_data",
    "pack_conversation",
    "demo_model_config",
    "init_position_codes",
    "build_demo_model",
    "quick_eval",
    "run_demo",
    "main",
]

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
_QUICK_BUDGET = {"caption": 48, "classify": 8, "vqa": 8, "ground": 24, "count": 8}


@dataclass
class DemoModel:
    """Widths of the demo SkyMoE (all multiples of 64 where bitsandbytes quantizes).

    Attributes:
        image_size: vision input side in px (504 as the full model).
        patch_size: vision patch side in px (28 -> 18 x 18 = 324 image tokens at 504 px).
        vision_hidden / vision_layers / vision_heads: CLIP tower (MLP 4x wide).
        text_hidden / text_intermediate / text_layers / text_heads: Llama decoder.
        bpe_vocab: BPE vocabulary before the added grid/digit tokens.
        num_experts / top_k / aux_loss_coef: Stage II MoE (every second layer, odd indices).
        image_position_embedding: ``"none"`` or ``"2d"``: 2-D patch position embeddings added
            to the projected image tokens (``skymoe.SkyMoEConfig``).
        image_after_question: the first user turn puts the image after the question
            (``skymoe.SkyMoEConfig``), so the image tokens can see what is asked.
        object_tokens / object_context_grid: ``K > 0``: the language model reads pooled context
            tokens and the K patches where Stage 0's centre heatmap peaks instead of every
            patch (``skymoe.SkyMoEConfig``; needs Stage 0 with the heatmap centre loss and
            ``training.language_trainable: llm``, which keeps the tower as the heatmap knows it).
        object_codes: with object tokens, each also carries its detection from Stage 0's
            centre, colour and box heads (class and colour probabilities, box corner codes)
            through a learned projection (``skymoe.SkyMoEConfig.object_codes``).
    """

    image_size: int = 504
    patch_size: int = 28
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 256
    text_intermediate: int = 512
    text_layers: int = 4
    text_heads: int = 4
    bpe_vocab: int = 1000
    num_experts: int = 4
    top_k: int = 2
    aux_loss_coef: float = 0.01
    image_position_embedding: Literal["none", "2d"] = "none"
    image_after_question: bool = False
    object_tokens: int = 0
    object_context_grid: int = 3
    object_codes: bool = False


@dataclass
class TurnQuota:
    """Turns per task code packed into one conversation (one typed field per task code)."""

    SC: int = 1
    IC: int = 1
    VQA: int = 6
    VG: int = 5
    OC: int = 3


@dataclass
class DemoData:
    """Synthetic training data.

    Attributes:
        scenes: scenes generated for training (each one conversation).
        cda_share: share of scenes that also get CDA variants (each variant one conversation).
        cda_variants_per_scene: at most this many variants kept per augmented scene.
        dense_difficulty: difficulty ramp of the scenes the dense stage sees (curriculum).
        turns: per-task number of turns packed into a conversation (SC, IC, VQA, VG, OC).
        val_scenes: scenes of the held-out validation benchmark (seed ``seed + 1``).
        workers: processes generating scenes, CDA variants and conversations.
    """

    scenes: int = 2400
    cda_share: float = 0.2
    cda_variants_per_scene: int = 2
    dense_difficulty: list[float] = field(default_factory=lambda: [0.0, 0.6])
    turns: TurnQuota = field(default_factory=TurnQuota)
    val_scenes: int = 6
    workers: int = 2


@dataclass
class DemoTraining:
    """Schedule of the stages within the time budget.

    Attributes:
        budget_minutes: wall-clock budget of the whole recipe.
        vision_share: share of the time left after data generation given to Stage 0
            (:mod:`train.vision_pretrain`; 0 skips it).
        vision_lr / vision_batch: Stage 0's peak AdamW learning rate and images per step.
        vision_box_weight: weight of Stage 0's box-head loss (centre offset inside the patch and
            log size); the other head losses weigh 1.
        vision_centre_loss: how Stage 0's centre head learns where objects are
            (:func:`train.vision_pretrain.head_losses`): ``"heatmap"`` (CenterNet-style focal
            loss) or ``"poisson"`` (the earlier rates, which found no object on CPU).
        dense_share: share of the time left after Stage 0 given to the dense stage.
        micro_batch / global_batch: conversations per forward / per optimizer step.
        dense_lr / moe_lr: peak AdamW learning rates (cosine, warmup 5 %, floor 10 %).
        chunk_minutes: train this long between checkpoint + quick held-out check.
        max_length: token limit of a conversation (image tokens included).
        threads: torch CPU threads (0 = torch's default).
        loader_workers: processes decoding images for Stage 0 and the training loop (0 = in the
            training process; on a GPU the model is faster than one process can decode PNGs).
        box_attention: :mod:`train.box_attention` supervision in the dense and MoE stages
            (coef 0 = off).
        word_match_scale: :mod:`train.word_match`: head 0 of decoder layer 0 starts out matching
            class words to their patches, and Stage 0 aligns patches with the rotated class
            directions that head's keys read; the value scales its query and key rows (0 = off).
        language_trainable: what the dense stage and Stage II train (``train.stage2`` choices):
            ``"all"``, or ``"llm"`` to keep the tower and projector as Stage 0 left them (as the
            paper keeps CLIP frozen): what Stage 0 wrote into the tokens stays there, and a step
            skips the tower's backward pass.
        bf16: bf16 autocast in every stage where the hardware runs it natively
            (:func:`train.loop.has_bf16`: CUDA with bf16, or a CPU with AVX512-BF16 or AMX; on
            this 2-core AMD EPYC a step is 1.6x as fast); ``false`` trains in fp32.
    """

    budget_minutes: float = 90.0
    vision_share: float = 0.15
    vision_lr: float = 1e-3
    vision_batch: int = 16
    vision_box_weight: float = 1.0
    vision_centre_loss: CentreLoss = "heatmap"
    dense_share: float = 0.6
    micro_batch: int = 4
    global_batch: int = 8
    dense_lr: float = 1e-3
    moe_lr: float = 3e-4
    chunk_minutes: float = 12.0
    max_length: int = 800
    threads: int = 0
    loader_workers: int = 0
    box_attention: BoxAttentionSettings = field(default_factory=BoxAttentionSettings)
    word_match_scale: float = 0.0
    language_trainable: Literal["all", "llm"] = "all"
    bf16: bool = True


@dataclass
class DemoConfig:
    """``train/configs/demo.yaml``."""

    seed: int = 0
    model: DemoModel = field(default_factory=DemoModel)
    data: DemoData = field(default_factory=DemoData)
    training: DemoTraining = field(default_factory=DemoTraining)


@dataclass
class PhaseReport:
    """What one training phase did (written to ``training_summary.json``)."""

    name: str
    steps_planned: int
    steps_done: int
    seconds: float
    seconds_per_step: float
    conversations: int
    final_loss: float
    quick_eval: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- data


def pack_conversation(samples: list[InstructionSample], quota: dict[str, int],
                      rng: np.random.Generator) -> dict:
    """Several samples about one image as ONE multi-turn JSONL record.

    Picks up to ``quota[code]`` samples per task code, shuffles the turns, keeps
    ``"<image>\\n"`` only on the first human message. ``task``/``granularity`` are the first turn's.

    Args:
        samples: single-turn samples of the same image.
        quota: task code -> turns.
        rng: picks and order.

    Returns:
        The JSONL record (``train.dataset`` reads its alternating human/gpt turns).

    Raises:
        ValueError: the samples do not share one image, or none is picked.
    """
    if len({s.image for s in samples}) != 1:
        raise ValueError(f"pack_conversation needs samples of one image, got {sorted({s.image for s in samples})[:3]}")
    picked: list[InstructionSample] = []
    for code, n in quota.items():
        pool = [s for s in samples if s.task == code]
        picked += [pool[i] for i in rng.permutation(len(pool))[:n]]
    if not picked:
        raise ValueError(f"no sample of the tasks {sorted(quota)} for image {samples[0].image if samples else '?'}")
    picked = [picked[i] for i in rng.permutation(len(picked))]
    turns = []
    for i, sample in enumerate(picked):
        question = sample.prompt if i else f"<image>\n{sample.prompt}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": sample.answer}]
    first = picked[0]
    return {"id": f"{Path(first.image).stem}_conv", "image": first.image, "task": first.task,
            "granularity": first.granularity, "conversations": turns}


def _object_line(image, image_ref: str) -> dict:
    """One ``objects.jsonl`` line (:mod:`train.vision_pretrain`) of an annotated image."""
    return {"image": image_ref, "scene_class": image.scene_class, "width": image.width, "height": image.height,
            "objects": [{"label": o.label, "box_px": list(o.box_px), "colour": o.colour,
                         "size": o.attributes.get("size")} for o in image.objects]}


def _cda_records(scene, work_dir: Path, rng: np.random.Generator, cfg: DemoData) -> tuple[list[dict], list[dict]]:
    """CDA variants of one scene as conversations: the variant's own sample plus counts of two other classes.

    Counts come from the variant's annotations (updated by the edit); the class a cutout variant
    counts is not asked twice.

    Returns:
        ``(conversations, object lines)`` of the kept variants.
    """
    with Image.open(scene.image_path) as img:
        rgb = np.asarray(img.convert("RGB"))
    variants = augment_image(scene, rgb, rng, CdaOptions(cutout_variants=2, spatial_edits=1, colour_edits=1))
    records, object_lines = [], []
    for k in rng.permutation(len(variants))[: cfg.cda_variants_per_scene]:
        variant = variants[int(k)]
        path = Path(scene.image_path).with_name(f"{Path(scene.image_path).stem}_{variant.name}.png")
        write_image(path, variant.rgb)
        ref = str(path.relative_to(work_dir))
        asked = f"_OC_{variant.query.replace(' ', '_')}" if variant.task == "count" else None
        others = [s for s in make_samples(variant.image, ref, SampleOptions(tasks=frozenset({"OC"})))
                  if asked is None or not s.id.endswith(asked)]
        picked = variant.samples(ref) + [others[i] for i in rng.permutation(len(others))[:2]]
        record = pack_conversation(picked, dict(Counter(s.task for s in picked)), rng)
        records.append({**record, "augmentation": variant.record})
        object_lines.append(_object_line(variant.image, ref))
    return records, object_lines


def _scene_records(indexed_scene: tuple, work_dir: Path, cfg: DemoData, seed: int) -> tuple[list[dict], list[dict]]:
    """Conversations and object lines of scene ``(index, scene)`` and, for every
    ``1 / cda_share``-th scene, of its CDA variants.

    Each scene draws from its own generator (``[seed, 7, index]``), so the data are the same
    whichever worker builds them.
    """
    index, scene = indexed_scene
    rng = np.random.default_rng([seed, 7, index])
    ref = str(Path(scene.image_path).relative_to(work_dir))
    records = [pack_conversation(make_samples(scene, ref), asdict(cfg.turns), rng)]
    object_lines = [_object_line(scene, ref)]
    if cfg.cda_share > 0 and index % max(1, round(1 / cfg.cda_share)) == 0:
        variant_records, variant_objects = _cda_records(scene, work_dir, rng, cfg)
        records += variant_records
        object_lines += variant_objects
    return records, object_lines


def build_training_data(work_dir: Path, cfg: DemoData, seed: int) -> tuple[Path, Path, Path]:
    """Generate the scenes, CDA variants, packed conversations and per-image object annotations.

    Scenes ``0 .. scenes-1`` ramp from difficulty 0 to 1 (curriculum order). The dense stage
    gets the scenes whose difficulty lies in ``dense_difficulty`` (and their variants); the
    MoE stage gets all of them. Scenes, variants and conversations are built by ``cfg.workers``
    processes.

    Returns:
        ``(dense_jsonl, moe_jsonl, objects_jsonl)`` in ``work_dir`` (the last for Stage 0,
        :mod:`train.vision_pretrain`: every scene and variant).
    """
    scenes = generate_dataset(work_dir, cfg.scenes, seed=seed, difficulty=(0.0, 1.0), workers=cfg.workers)
    build = functools.partial(_scene_records, work_dir=work_dir, cfg=cfg, seed=seed)
    if cfg.workers > 1:
        with multiprocessing.get_context("fork").Pool(cfg.workers) as pool:
            per_scene = pool.map(build, enumerate(scenes), chunksize=8)
    else:
        per_scene = list(map(build, enumerate(scenes)))
    dense, full, object_lines = [], [], []
    lo, hi = cfg.dense_difficulty
    for i, (records, lines) in enumerate(per_scene):
        difficulty = i / max(1, len(scenes) - 1)
        full += records
        object_lines += lines
        if lo <= difficulty <= hi:
            dense += records
    paths = (work_dir / "dense.jsonl", work_dir / "moe.jsonl", work_dir / "objects.jsonl")
    for path, records in zip(paths, (dense, full, object_lines)):
        write_jsonl(path, records)
    logger.info("training data: %d scenes, %d conversations (dense stage %d)", len(scenes), len(full), len(dense))
    return paths


def _conversation_texts(jsonl: Path) -> list[str]:
    """Rendered conversations of a JSONL file (the tokenizer corpus)."""
    records, _ = read_instruction_jsonl(jsonl, check_images=False)
    return [render_conversation(list(r.turns), add_generation_prompt=False) for r in records]


# ----------------------------------------------------------------------------- model


def demo_model_config(cfg: DemoModel, tokenizer) -> skymoe.SkyMoEConfig:
    """The dense SkyMoE config of the demo (vocabulary rounded up to a multiple of 64)."""
    vision = {"hidden_size": cfg.vision_hidden, "intermediate_size": 4 * cfg.vision_hidden,
              "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
              "image_size": cfg.image_size, "patch_size": cfg.patch_size, "projection_dim": cfg.vision_hidden}
    text = {"hidden_size": cfg.text_hidden, "intermediate_size": cfg.text_intermediate,
            "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": cfg.text_heads, "vocab_size": -(-len(tokenizer) // 64) * 64,
            "max_position_embeddings": 1024, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vocab = _patch_vocabulary()  # the classes and colours Stage 0's heads, and so the object modules, predict
    return skymoe.tiny_config(
        vision_config=vision, text_config=text, num_experts=1, moe_layers=[],
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,  # a 4-layer tower has no spare layer to skip
        router_aux_loss_coef=cfg.aux_loss_coef, image_position_embedding=cfg.image_position_embedding,
        image_after_question=cfg.image_after_question, object_tokens=cfg.object_tokens,
        object_classes=len(vocab.object_classes) if cfg.object_tokens else 0,
        object_context_grid=cfg.object_context_grid, object_codes=cfg.object_codes,
        object_colours=len(vocab.colours) if cfg.object_codes else 0,
    )


def init_position_codes(model: skymoe.SkyMoEForConditionalGeneration, tokenizer,
                        patch_amplitude: float = 0.5) -> None:
    """Give the from-scratch model position information it can use from step 0.

    * Vision tower: 2-D sine/cosine patch position embeddings (half the width codes the row,
      half the column; the class token gets zeros), amplitude ``patch_amplitude``. CLIP's default
      init (normal, std 0.02) is ~40x weaker than a patch's content embedding (~1 per value for
      CLIP-normalised pixels), and the first demo runs barely grew it in 500 steps: the
      language model could not tell where an object was, and grounding stayed at 0 %.
    * Grid tokens ``<0>``..``<100>``: input embeddings and ``lm_head`` rows are 1-D codes of the
      grid value at the default init's scale (RMS 0.02), so neighbouring coordinates start
      similar and a hidden state near one coordinate's row scores its neighbours high too.

    All of these stay trainable; only the starting point changes.
    """
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    half = vision.hidden_size // 2
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    patch_codes = torch.cat([sincos_codes(rows.flatten(), half, 2.0, 4.0 * side),
                             sincos_codes(cols.flatten(), half, 2.0, 4.0 * side)], dim=1)
    grid_ids = tokenizer.convert_tokens_to_ids([f"<{k}>" for k in range(101)])
    grid_codes = sincos_codes(torch.arange(101), model.config.text_config.hidden_size, 4.0, 400.0)
    grid_codes *= model.config.text_config.initializer_range * math.sqrt(2.0)  # RMS of the codes = 1 / sqrt(2)
    with torch.no_grad():
        positions = model.model.vision_tower.embeddings.position_embedding.weight
        positions[0].zero_()
        positions[1:] = patch_amplitude * patch_codes
        model.get_input_embeddings().weight[grid_ids] = grid_codes
        model.get_output_embeddings().weight[grid_ids] = grid_codes


def build_demo_model(cfg: DemoModel, tokenizer, seed: int) -> tuple[skymoe.SkyMoEForConditionalGeneration, object]:
    """A fresh dense demo model (fp32, position codes from :func:`init_position_codes`) and its processor."""
    config = demo_model_config(cfg, tokenizer)
    torch.manual_seed(seed)
    model = skymoe.SkyMoEForConditionalGeneration(config)
    init_position_codes(model, tokenizer)
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    return model, skymoe.SkyMoEProcessor.for_config(config, tokenizer)


# ----------------------------------------------------------------------------- quick held-out check


@torch.no_grad()
def _greedy(model, processor, images: list[Image.Image], prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers through transformers' ``generate`` (left padding, KV cache)."""
    texts = [render_conversation([(p, None)], image_after_question=model.config.image_after_question)
             for p in prompts]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt").to(model.device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def quick_eval(model, processor, records, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Per-task scores of greedy answers on held-out records (one query per record, captions of
    one image pooled into one query as in :mod:`train.eval`).

    SC, VQA, VG and OC are scored by :func:`train.eval.score_results`; captions by a cheap
    proxy, pycocoevalcap's BLEU-4 on lower-cased whitespace tokens against the pooled references
    (the Java tokenizer and METEOR take a minute per call: the real numbers come from
    ``python -m train.eval``).

    Returns:
        Task -> metrics (``n`` included).
    """
    was_training = model.training
    model.eval()
    results, sizes = [], {}
    queries = [recs for recs, _ in group_queries(records)]
    for task in sorted({recs[0].task for recs in queries}):
        todo = [recs for recs in queries if recs[0].task == task]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            images = [Image.open(recs[0].image_path).convert("RGB") for recs in chunk]
            answers = _greedy(model, processor, images, [recs[0].prompt for recs in chunk], _QUICK_BUDGET[task])
            for recs, image, answer in zip(chunk, images, answers):
                rec = recs[0]
                results.append(SampleResult(rec.id, task, rec.granularity, rec.prompt, answer.strip(),
                                            [r.answer for r in recs], 1.0))
                sizes[rec.id] = image.size
    model.train(was_training)
    captions = [r for r in results if r.task == "caption"]
    scores = score_results([r for r in results if r.task != "caption"], sizes).per_task
    if captions and importlib.util.find_spec("pycocoevalcap") is not None:
        scores["caption"] = {"n": float(len(captions)), "BLEU-4 (proxy)": _bleu4_proxy(captions)}
    elif captions:  # an evaluation dependency, which a training-only GPU machine may lack
        logger.info("caption proxy skipped: pycocoevalcap is not installed")
    logger.info("quick held-out check: %s", json.dumps({k: {m: round(v, 3) for m, v in d.items()}
                                                        for k, d in scores.items()}))
    return scores


def _bleu4_proxy(results: list[SampleResult]) -> float:
    """BLEU-4 x 100 on lower-cased, punctuation-split whitespace tokens (no Java)."""
    from pycocoevalcap.bleu.bleu import Bleu

    def tokens(text: str) -> str:
        return " ".join("".join(c if c.isalnum() else f" {c} " for c in text.lower()).split())

    refs = {str(i): [tokens(x) for x in r.references] for i, r in enumerate(results)}
    hyps = {str(i): [tokens(r.prediction) or "-"] for i, r in enumerate(results)}
    score, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    return 100.0 * float(score[3])


# ----------------------------------------------------------------------------- training


def _seconds_per_step(model, dataset, collator, tcfg: DemoTraining, box_attention: BoxAttentionLoss | None) -> float:
    """Measured seconds of one optimizer step, times the accumulation of timed micro-batches.

    The micro-batches come from a DataLoader set up as the loop's (``loader_workers``
    processes), each through forward and backward (gradients dropped; with the box-attention
    loss when the phase uses it), timed by :func:`train.loop.seconds_per_call_after_prefetch`.
    """
    device = next(model.parameters()).device
    plan = ([(b * tcfg.micro_batch + i) % len(dataset) for i in range(tcfg.micro_batch)] for b in itertools.count())
    batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=plan, collate_fn=collator,
                                               num_workers=tcfg.loader_workers))
    model.train()

    def micro_step() -> None:
        batch = {k: v.to(device) for k, v in next(batches).items()}
        with bf16_autocast(device, tcfg.bf16):
            loss, _ = plus_box_attention(model(**batch).loss, batch, box_attention)
        loss.backward()
        float(loss.detach())  # waits for the device, as the loop's logging does

    with supervising(box_attention):
        per_micro, _ = seconds_per_call_after_prefetch(micro_step, tcfg.loader_workers)
    del batches  # stops the loader's workers
    model.zero_grad(set_to_none=True)
    return per_micro * tcfg.global_batch / tcfg.micro_batch


def run_phase(name: str, model, processor, train_jsonl: Path, val_records, tcfg: DemoTraining, lr: float,
              seconds: float, run_dir: Path, seed: int) -> PhaseReport:
    """Train ``model`` in place for about ``seconds`` with the explicit loop, in checked chunks.

    The step count is planned from a measured step time (cosine schedule over the plan);
    after every chunk (``chunk_minutes``, at most a sixth of the plan) the loop checkpoints and
    a quick held-out check runs; the phase stops early when the next chunk, at the speed seen
    so far, would end past ``seconds`` (a shared machine can slow down; the budget is a hard limit).

    Args:
        name: phase name (``"dense"`` or ``"moe"``), the loop's folder under ``run_dir``.
        model, processor: the model to train (fp32) and its processor.
        train_jsonl: packed conversations.
        val_records: held-out :class:`train.dataset.InstructionRecord` s for the quick check.
        tcfg: batch sizes, chunk length, sequence limit.
        lr: peak learning rate.
        seconds: time share of this phase.
        run_dir: where the loop writes checkpoints and ``log.jsonl``.
        seed: loop seed (data order).
    """
    records, _ = read_instruction_jsonl(train_jsonl)
    dataset = InstructionDataset(records, processor, tcfg.max_length, model.config.image_after_question)
    collator = PaddingCollator(processor.tokenizer.pad_token_id)
    box_attention = (BoxAttentionLoss(model, processor.tokenizer, tcfg.box_attention)
                     if tcfg.box_attention.coef > 0 else None)
    per_step = _seconds_per_step(model, dataset, collator, tcfg, box_attention)
    total = max(1, int(0.9 * seconds / per_step))
    # at least 6 chunks: the time check between chunks must catch a machine slower than measured
    chunk = max(1, min(math.ceil(total / 6), int(tcfg.chunk_minutes * 60 / per_step)))
    steps_per_epoch = math.ceil(len(dataset) / tcfg.global_batch)
    loop_cfg = LoopConfig(output_dir=str(run_dir / name), epochs=math.ceil(total / steps_per_epoch),
                          global_batch_size=tcfg.global_batch, per_device_batch_size=tcfg.micro_batch,
                          bf16=tcfg.bf16, seed=seed, save_every_steps=chunk, keep_checkpoints=1, max_steps=total,
                          resume="auto", num_workers=tcfg.loader_workers)
    optim = OptimConfig(lr=lr, min_lr_ratio=0.1, warmup_ratio=0.05, weight_decay=0.0, max_grad_norm=1.0)
    logger.info("phase %s: %d conversations, %.2f s/step measured -> %d steps (%.1f epochs), chunks of %d",
                name, len(dataset), per_step, total, total / steps_per_epoch, chunk)
    report = PhaseReport(name, total, 0, 0.0, per_step, len(dataset), float("nan"))
    start = time.monotonic()
    while report.steps_done < total:
        result = train(model, dataset, collator, loop_cfg, optim, stop_after=min(total, report.steps_done + chunk),
                       box_attention=box_attention)
        report.steps_done, report.final_loss = result.last_step, result.history[-1].loss
        report.quick_eval.append({"step": result.last_step, "minutes": (time.monotonic() - start) / 60,
                                  "loss": report.final_loss, **quick_eval(model, processor, val_records)})
        elapsed = time.monotonic() - start
        next_chunk_s = min(chunk, total - report.steps_done) * elapsed / report.steps_done
        if report.steps_done < total and elapsed + next_chunk_s > seconds:
            logger.warning("phase %s: the next chunk would overrun the time share (%.1f of %.1f min used); "
                           "stopping at step %d of %d", name, elapsed / 60, seconds / 60, report.steps_done, total)
            break
    report.seconds = time.monotonic() - start
    report.seconds_per_step = report.seconds / max(1, report.steps_done)
    return report


def _summary_card(cfg: DemoConfig, summary: dict) -> str:
    """The model card written next to the weights (scores are added after evaluation)."""
    m, d = cfg.model, cfg.data
    vision = summary.get("vision_pretraining")
    if vision:
        check = vision["held_out"]
        vision_line = (f"{vision['steps_done']} steps of {cfg.training.vision_batch} images in "
                       f"{vision['seconds'] / 60:.1f} min, lr {cfg.training.vision_lr:g}; held-out check: counts from "
                       f"the centre heads {check['count_exact']:.0f} % exact ({check['count_within1']:.0f} % "
                       f"within one), object centres found {check['centre_recall']:.0f} % (peaks right "
                       f"{check['centre_precision']:.0f} %), centre error "
                       f"{check['centre_error_patches']:.2f} patches, colour {check['colour_accuracy']:.0f} %, "
                       f"patch row and column {check['position_accuracy']:.0f} %, box corners "
                       f"off by {check['corner_error_grid']:.1f} grid units, patches nearest their class's word "
                       f"{check['word_match_accuracy']:.0f} %, boxes read off an object's centre patch within IoU "
                       f"0.5: box head {check['centre_box_acc50']:.0f} %, corner heads {check['corner_box_acc50']:.0f} "
                       f"% (the true size at the patch middle: {check['patch_only_acc50']:.0f} %)")
    else:
        vision_line = "skipped"
    box = cfg.training.box_attention
    box_line = (f"\n- Box-attention supervision (`train.box_attention`) in both stages: head {box.head} of decoder layer "
                f"{box.layer} is pushed to look at the box's patches where a box is written, weight {box.coef:g}."
                if box.coef > 0 else "")
    word_match_line = (f"\n- Word-match head (`train.word_match`): head 0 of decoder layer 0 started out matching the "
                       f"class words to their patches (query and key rows scaled {cfg.training.word_match_scale:g}); "
                       "Stage 0 aligned each class's patches with that head's key direction for the class."
                       if cfg.training.word_match_scale > 0 else "")
    image_tokens = f"{(m.image_size // m.patch_size) ** 2} image tokens"
    if m.object_tokens:
        image_tokens = (f"of which the language model reads {m.object_context_grid ** 2} pooled context tokens and "
                        f"the {m.object_tokens} patches where Stage 0's centre heatmap peaks"
                        + (", each with its detection code (class, colour, box corners)" if m.object_codes else ""))
    trained = ("all parameters" if cfg.training.language_trainable == "all"
               else "the language model (tower and projector frozen after Stage 0)")
    phases = "\n".join(f"| {p['name']} | {p['conversations']} | {p['steps_done']} / {p['steps_planned']} | "
                       f"{p['seconds'] / 60:.1f} | {p['final_loss']:.3f} |" for p in summary["phases"])
    return f"""# SkyMoE demo checkpoint (synthetic domain only)

A small SkyMoE trained from scratch by `python -m train.demo --config {summary['config_file']} --out
{summary['out']} --budget-minutes {cfg.training.budget_minutes:g} --seed {cfg.seed}` in {summary['minutes']:.1f} minutes on {summary['device']}
({summary['precision']}).
It exists so the app works out of the box; it has only ever seen procedurally generated
scenes (`train.synthetic`) and is **not** a remote-sensing model for real imagery.

## Model
- CLIP-architecture vision tower: {m.vision_layers} layers, width {m.vision_hidden}, {m.image_size} px input,
  {m.patch_size} px patches ({image_tokens}), last layer's features.
- LLaVA 2-layer MLP projector; Llama decoder: {m.text_layers} layers, width {m.text_hidden}, MLP {m.text_intermediate}.
- MoE: {m.num_experts} experts, top-{m.top_k}, on decoder layers {summary['moe_layers']} (upcycled), alpha = {m.aux_loss_coef}.
- Tokenizer: byte-level BPE ({summary['vocab']} ids) trained on the training conversations, with the box
  grid `<0>`..`<100>` and the digits as single tokens. Parameters: {summary['params'] / 1e6:.2f} M (bf16 weights).

## Data and recipe
- {d.scenes} synthetic scenes (seed {cfg.seed}, 9 scene classes, difficulty ramped 0 -> 1), CDA variants
  (count-varying cutout, spatial and colour edits) for every {max(1, round(1 / d.cda_share)) if d.cda_share else 0}th scene.
- Initialisation: 2-D sine/cosine patch position embeddings (amplitude 0.5) and 1-D sine/cosine
  codes for the grid tokens' input and output embeddings (`train.demo.init_position_codes`).
- Stage 0 (`train.vision_pretrain`): vision tower and projector trained with per-patch heads
  (object centres per class, class cover, box offset and size, colour, patch row and column, the
  covering box's corners on the answer grid; scene class; the cover and colour logits read the
  tokens along the language model's embeddings of the class and colour words) on every
  training image, {vision_line}.
- Instruction samples from `train.instructions`, packed per image into one multi-turn conversation
  (turns per task {asdict(d.turns)}); loss on answer tokens only.
- Stage "dense": {trained}, scenes of difficulty {d.dense_difficulty[0]}-{d.dense_difficulty[1]}, AdamW lr
  {cfg.training.dense_lr:g}; Stage II: `skymoe.upcycle`, {trained}, all scenes, LM + alpha * aux, lr {cfg.training.moe_lr:g};
  cosine schedules, global batch {cfg.training.global_batch}.{box_line}{word_match_line}

| phase | conversations | steps done / planned | minutes | last loss |
|---|---|---|---|---|
{phases}

## Limits
Synthetic domain only: the scenes, object classes ({', '.join(summary['object_classes'])}), colours and
phrasings are those of the generator. Expect nothing useful on real imagery.
"""



# ----------------------------------------------------------------------------- the recipe


def check_object_tokens(cfg: DemoConfig) -> None:
    """Object tokens are picked by Stage 0's centre heatmap from a tower that must then stay as it is.

    Raises:
        ConfigError: ``model.object_tokens`` without Stage 0, its heatmap centre loss or
            ``training.language_trainable: llm``; ``model.object_codes`` without object tokens.
    """
    t = cfg.training
    if cfg.model.object_codes and not cfg.model.object_tokens:
        raise ConfigError("model.object_codes describes object tokens: set model.object_tokens > 0 as well")
    if cfg.model.object_tokens and (t.vision_share <= 0 or t.vision_centre_loss != "heatmap"
                                    or t.language_trainable != "llm"):
        raise ConfigError("model.object_tokens picks patches with Stage 0's centre heatmap: it needs "
                          "training.vision_share > 0, training.vision_centre_loss=heatmap and "
                          "training.language_trainable=llm (a tower trained on by the language stages would "
                          "drift away from the heatmap)")


def run_demo(cfg: DemoConfig, out_dir: Path, work_dir: Path, config_file: str | Path = DEFAULT_CONFIG) -> dict:
    """The whole recipe (module docstring); returns the training summary written beside the weights.

    ``config_file`` is only recorded (summary and card): ``cfg`` holds the settings.

    Raises:
        ConfigError: object tokens without what they need (:func:`check_object_tokens`).
    """
    check_object_tokens(cfg)
    start = time.monotonic()
    budget_s = cfg.training.budget_minutes * 60
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    dense_jsonl, moe_jsonl, objects_jsonl, val_path = _cached_data(work_dir, cfg)
    val_records, _ = read_instruction_jsonl(val_path)
    tokenizer = skymoe.build_tokenizer(_conversation_texts(moe_jsonl), vocab_size=cfg.model.bpe_vocab)
    model, processor = build_demo_model(cfg.model, tokenizer, cfg.seed)
    class_directions = (_init_word_match(model, tokenizer, cfg.training.word_match_scale, cfg.seed)
                        if cfg.training.word_match_scale > 0 else None)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    run_dir = Path(tempfile.mkdtemp(prefix="runs-", dir=work_dir))  # never resume another run's checkpoints
    logger.info("data and tokenizer ready after %.1f min", (time.monotonic() - start) / 60)
    reserve_s = 60.0 if budget_s > 600 else 0.1 * budget_s  # saving and the card
    left = budget_s - (time.monotonic() - start) - reserve_s
    vision = None
    if cfg.training.vision_share > 0:
        vision = pretrain_vision(model, processor, objects_jsonl, _patch_vocabulary(), left * cfg.training.vision_share,
                                 cfg.training.vision_lr, cfg.training.vision_batch, cfg.seed,
                                 workers=cfg.training.loader_workers, box_weight=cfg.training.vision_box_weight,
                                 class_directions=class_directions, centre_loss=cfg.training.vision_centre_loss,
                                 bf16=cfg.training.bf16)
    left = budget_s - (time.monotonic() - start) - reserve_s
    set_trainable(model, cfg.training.language_trainable)
    dense = run_phase("dense", model, processor, dense_jsonl, val_records, cfg.training, cfg.training.dense_lr,
                      left * cfg.training.dense_share, run_dir, cfg.seed)
    # the dense stage's end point, kept for Stage II ablations (python -m train.ablation)
    save_model_folder(model, processor, run_dir / "dense-model", torch.float32)
    model = skymoe.upcycle(model, cfg.model.num_experts, None, num_experts_per_tok=cfg.model.top_k)
    set_trainable(model, cfg.training.language_trainable)
    left = budget_s - (time.monotonic() - start) - reserve_s
    moe = run_phase("moe", model, processor, moe_jsonl, val_records, cfg.training, cfg.training.moe_lr,
                    left, run_dir, cfg.seed + 2)
    params = sum(p.numel() for p in model.parameters())
    save_model_folder(model.eval(), processor, out_dir, torch.bfloat16)
    summary = {
        "out": str(out_dir), "minutes": (time.monotonic() - start) / 60, "config": asdict(cfg),
        "config_file": _shown_path(config_file),
        "device": (f"{torch.get_num_threads()} CPU threads" if not torch.cuda.is_available()
                   else f"one {torch.cuda.get_device_name()} GPU"),
        "precision": ("bf16 autocast" if cfg.training.bf16 and has_bf16(next(model.parameters()).device)
                      else "fp32"),
        "vocab": len(tokenizer), "params": params, "moe_layers": model.config.moe_layers,
        "object_classes": _object_classes(),
        "vision_pretraining": asdict(vision) if vision else None,
        "phases": [asdict(dense), asdict(moe)], "validation_seed": cfg.seed + 1, "run_dir": str(run_dir),
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "README.md").write_text(_summary_card(cfg, summary))
    logger.info("demo checkpoint written to %s after %.1f min", out_dir, summary["minutes"])
    return summary


def _init_word_match(model, tokenizer, scale: float, seed: int) -> torch.Tensor:
    """Start head 0 of decoder layer 0 as a class-word-to-patch matcher (:mod:`train.word_match`);
    returns the patch directions Stage 0 must align the classes' patches with."""
    vocab = _patch_vocabulary()
    words = word_directions(tokenizer, model.get_input_embeddings().weight, vocab)[:len(vocab.object_classes)]
    patches = patch_directions(words, seed)
    dims = init_word_match_head(model, words, patches, layer=0, head=0, scale=scale)
    logger.info("word-match head: layer 0, head 0, class channels on head dimensions %s, scale %g", dims, scale)
    return patches


def _cached_data(work_dir: Path, cfg: DemoConfig) -> tuple[Path, Path, Path, Path]:
    """Training and validation data in ``work_dir``: reused when a previous run with the same data
    settings and seed wrote it there (``data_stamp.json``), generated otherwise.

    Returns:
        ``(dense_jsonl, moe_jsonl, objects_jsonl, val_jsonl)``.
    """
    stamp = work_dir / "data_stamp.json"
    wanted = {"seed": cfg.seed, "data": asdict(cfg.data)}
    paths = (work_dir / "dense.jsonl", work_dir / "moe.jsonl", work_dir / "objects.jsonl",
             work_dir / "val" / "benchmark.jsonl")
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and all(p.is_file() for p in paths):
        logger.info("reusing the training data in %s (same data settings and seed)", work_dir)
        return paths
    dense_jsonl, moe_jsonl, objects_jsonl = build_training_data(work_dir, cfg.data, cfg.seed)
    val_path = build_synthetic_benchmark(work_dir / "val", cfg.data.val_scenes * 5, seed=cfg.seed + 1)
    stamp.write_text(json.dumps(wanted))
    return dense_jsonl, moe_jsonl, objects_jsonl, val_path


def _shown_path(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (train/configs/...), else as given."""
    repo = Path(__file__).resolve().parent.parent
    resolved = Path(path).resolve()
    return str(resolved.relative_to(repo)) if resolved.is_relative_to(repo) else str(path)


def _patch_vocabulary() -> PatchVocabulary:
    """Stage 0's label sets: the synthetic generator's object classes, colours and scene classes."""
    from train.synthetic.classes import COLOURS, OBJECT_CLASSES, SCENE_CLASSES

    return PatchVocabulary(tuple(OBJECT_CLASSES), tuple(COLOURS), tuple(sorted(SCENE_CLASSES)))


def _object_classes() -> list[str]:
    """The synthetic generator's object classes (for the card)."""
    from train.synthetic import OBJECT_CLASSES

    return sorted(OBJECT_CLASSES)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="checkpoint folder to write (e.g. assets/skymoe-demo)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo YAML (default: %(default)s)")
    parser.add_argument("--budget-minutes", type=float, default=None, help="wall-clock budget (overrides the config)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (validation uses seed + 1)")
    parser.add_argument("--work-dir", default=None,
                        help="scenes, JSONL and loop checkpoints (default: a temp folder); data generated there "
                             "by an earlier run with the same data settings and seed is reused")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. data.scenes=100")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.set)
    if args.budget_minutes is not None:
        overrides.append(f"training.budget_minutes={args.budget_minutes}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    try:
        cfg = load_config(args.config, DemoConfig, overrides)
        check_object_tokens(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.training.budget_minutes <= 0:
        print(f"error: --budget-minutes must be > 0, got {cfg.training.budget_minutes}", file=sys.stderr)
        return 2
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="skymoe-demo-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        summary = run_demo(cfg, out, work.resolve(), args.config)
    print(f"wrote {out} in {summary['minutes']:.1f} min; evaluate with: python -m train.eval --model {out} "
          f"--synthetic --seed <never used in training> --n 500 --out <metrics.json>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
