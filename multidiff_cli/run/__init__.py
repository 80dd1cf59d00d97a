"""Running renders: plan a batch, run it (across processes too), check memory, upscale, smoke-test.

The upscale defaults live here, where the CLI reads them for its help without importing a model
library or the scene schema."""

UPSCALE_SCALE = 2.0  # `multidiff upscale`: twice the width and height
UPSCALE_STRENGTH = 0.3  # an upscale adds detail; it should not repaint the picture
