"""Models: Components on a device, loading (hub id, diffusers folder), random-weight models, the SD denoiser."""
