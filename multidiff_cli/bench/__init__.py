"""The tools that measure multidiff: `multidiff bench` (the sampler against the authors' loop, UNet call
sizes, diffusers' panorama pipeline as a peer) and `make gpu-check`. Above `run/`: they render as users do."""
