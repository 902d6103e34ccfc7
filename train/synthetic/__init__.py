"""Procedural synthetic aerial scenes with ground truth for all five SkyMoE tasks, and GeoTIFF mosaics.

Public entry points: :func:`generate_scene`, :func:`generate_dataset`, :func:`build_scene`,
:func:`render_scene`; mosaics in :mod:`train.synthetic.mosaic` (``python -m train.synthetic.mosaic``),
contact sheets in :mod:`train.synthetic.sheet`.
"""

from train.synthetic.classes import OBJECT_CLASSES, SCENE_CLASSES
from train.synthetic.dataset import generate_dataset, sample_specs
from train.synthetic.geometry import GRID_CELLS, cell_bounds, grid_cell
from train.synthetic.render import render_scene
from train.synthetic.scene import annotate, build_scene, generate_scene

__all__ = [
    "OBJECT_CLASSES", "SCENE_CLASSES", "GRID_CELLS", "cell_bounds", "grid_cell",
    "render_scene", "annotate", "build_scene", "generate_scene", "generate_dataset", "sample_specs",
]
