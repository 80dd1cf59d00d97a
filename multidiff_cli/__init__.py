"""multidiff: compose images from a YAML scene with MultiDiffusion on Stable Diffusion 2."""

__version__ = "0.1.0"
