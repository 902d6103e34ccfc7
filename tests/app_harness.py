"""Shared pieces of the app tests: a real tiny SkyMoE taught one answer, test rasters, one app process.

``make_box_model`` builds skymoe's random tiny checkpoint and sets a few weights by hand so
that greedy decoding answers every prompt with one fixed GeoChat box: a real transformers model
run through the real processor, generation, parsing and georeferencing, whose output is
predictable enough to assert features on the map. ``shared_app`` starts ``python app.py`` once per pytest process for all app test modules.
"""

from __future__ import annotations

import atexit
import contextlib
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import transform_bounds

from tests.browser import running_app
from tests.fixtures.make_rasters import make_rgb

__all__ = ["BOX_ANSWER", "make_box_model", "make_scene", "footprint_lonlat", "shared_app", "SharedApp"]

#: The answer the test model gives to every prompt: one box on the 0-100 grid of a tile.
BOX_ANSWER = "{<20><30><60><50>|0}"


def make_box_model(out_dir: Path, answer: str = BOX_ANSWER) -> Path:
    """Write a tiny SkyMoE checkpoint to ``out_dir`` whose greedy answer to any prompt is ``answer``.

    Starts from skymoe's random tiny checkpoint and sets weights by hand (no training): every
    attention ``o_proj`` and MLP/expert ``down_proj`` of the language model is zeroed, so the last
    hidden state is the current token's embedding, and embedding / lm_head rows chain the end of
    the generation prompt through the answer's tokens to ``</s>``. Routers, vision tower and
    projector keep their random weights, so routing capture still sees real routing.
    """
    import skymoe
    import torch

    skymoe.make_tiny_checkpoint(out_dir)
    model, processor = skymoe.load_model(out_dir, quant="none", device="cpu")
    tokenizer = processor.tokenizer
    head = skymoe.render_conversation([(skymoe.build_prompt("count", "car"), None)], add_generation_prompt=True)
    image = np.zeros((56, 56, 3), np.uint8)
    last = int(processor(images=[image], text=[head], return_tensors="pt")["input_ids"][0, -1])
    chain = [last, *tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError(f"answer {answer!r} repeats a token; a token-chain model needs distinct tokens")
    embed, head_w = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed.data_ptr() == head_w.data_ptr():
        raise ValueError("tied embeddings: the token chain needs a separate lm_head")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision" not in name and name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        for i, (src, dst) in enumerate(zip(chain[:-1], chain[1:])):
            embed[src] = 0.0
            embed[src, i] = 1.0
            head_w[dst, i] = 10.0  # logit ~80 after RMSNorm for the next token of the chain
    model.save_pretrained(out_dir)
    return out_dir


def make_scene(path: Path, width: int = 1000, height: int = 700) -> Path:
    """A UTM GeoTIFF of ``width`` x ``height`` px (10 m pixels): 6 tiles of 504 px with 64 px overlap."""
    return make_rgb(path, width=width, height=height)


def footprint_lonlat(path: Path) -> tuple[float, float, float, float]:
    """``(west, south, east, north)`` of the raster's footprint in degrees (densified edges)."""
    with rasterio.open(path) as ds:
        return transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)


class SharedApp:
    """One running app with its test files (``url``, ``model_dir``, ``scene``, ``root``, ``log``)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="skymoe-apptest-"))
        self.model_dir = make_box_model(self.root / "box-model")
        self.scene = make_scene(self.root / "scene.tif")
        self.data_dir = self.root / "data"
        self.data_dir.mkdir()
        (self.root / "tmp").mkdir()
        self.log = self.root / "app.log"
        self._stack = contextlib.ExitStack()
        self.url = self._stack.enter_context(running_app(
            ["--model", str(self.model_dir), "--quant", "none", "--raster", str(self.scene),
             "--max-upload-mb", "3", "--allow-dir", str(self.data_dir)],
            self.log, env={"TMPDIR": str(self.root / "tmp")}))

    def close(self) -> None:
        """Stop the app."""
        self._stack.close()


_SHARED: list[SharedApp] = []


def shared_app() -> SharedApp:
    """The app process shared by the app test modules of this pytest run (started on first use)."""
    if not _SHARED:
        app = SharedApp()
        _SHARED.append(app)
        atexit.register(app.close)
    return _SHARED[0]
