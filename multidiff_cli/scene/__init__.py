"""Scenes: the schema, loading with errors that point at YAML lines, the latent grid, the starter scene."""
from .load import changeable_cells, load_scene, region_cells, scene_from_dict, scene_warnings
from .schema import Region, Scene

__all__ = ["Region", "Scene", "changeable_cells", "load_scene", "region_cells", "scene_from_dict", "scene_warnings"]
