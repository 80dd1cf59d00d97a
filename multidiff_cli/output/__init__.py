"""What multidiff writes: PNGs with their records, layout previews and contact sheets, tables and texts."""
from pathlib import Path

OUTPUT_DIR = Path("outputs")  # where pictures, layouts and upscale scenes go unless told otherwise
