"""`python -m multidiff_cli`: the same as the `multidiff` command (torchrun and accelerate launch it this way)."""
from .cli import main

main()
