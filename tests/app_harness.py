"""Shared pieces of the app tests: a real tiny SkyMoE taught one answer, test rasters, one app process.

``make_box_model`` builds skymoe's random tiny checkpoint and fine-tunes it for a few seconds
(real forward/backward passes, AdamW) until greedy decoding answers every prompt with one
fixed GeoChat box: a real model whose output is predictable enough to assert features on the
map. ``shared_app`` starts ``python app.py`` once per pytest process for all app test modules.
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

#: The answer the test model learns: one box on the 0-100 grid of a tile.
BOX_ANSWER = "{<20><20><60><50>|0}"
_PROMPTS = [("count", "small vehicle"), ("ground", "the red car"), ("ground", "the large ship"),
            ("count", "car")]


def _train_inputs(processor, image, prompt: str, answer: str):
    import skymoe
    import torch

    full = skymoe.render_conversation([(prompt, answer)], add_generation_prompt=False)
    head = skymoe.render_conversation([(prompt, None)], add_generation_prompt=True)
    batch = processor(images=[image], text=[full], return_tensors="pt")
    prefix = processor(images=[image], text=[head], return_tensors="pt")["input_ids"].shape[1]
    labels = batch["input_ids"].clone()
    labels[:, :prefix] = -100  # learn the answer tokens only
    batch["labels"] = labels
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def make_box_model(out_dir: Path, answer: str = BOX_ANSWER, steps: int = 120, seed: int = 0) -> Path:
    """Write a tiny SkyMoE checkpoint to ``out_dir`` that answers ``answer`` to the test prompts."""
    import skymoe
    import skymoe.presets
    import torch

    torch.manual_seed(seed)
    skymoe.presets.make_tiny_checkpoint(out_dir)
    model, processor = skymoe.load_model(out_dir, quant="none", device="cpu")
    rng = np.random.default_rng(seed)
    examples = [_train_inputs(processor, rng.integers(0, 255, (56, 56, 3), dtype=np.uint8),
                              skymoe.build_prompt(task, query), answer) for task, query in _PROMPTS]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        loss = model(**examples[step % len(examples)]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
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
             "--max-upload-mb", "1", "--allow-dir", str(self.data_dir)],
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
