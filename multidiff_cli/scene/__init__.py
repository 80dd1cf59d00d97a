"""Scenes: the schema, loading with errors that point at YAML lines, validation, geometry, warnings, paths."""
from .geometry import changeable_cells, region_cells
from .load import load_scene, scene_from_dict
from .schema import Region, Scene
from .validation import checked_for

__all__ = ["Region", "Scene", "changeable_cells", "checked_for", "load_scene", "region_cells", "scene_from_dict"]
