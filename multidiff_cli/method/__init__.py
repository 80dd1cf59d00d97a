"""The paper (Bar-Tal et al., 2023), torch only: the sampler, views, fusion weights, guidance, schedulers.

Nothing here reads files, YAML or tokenizers: a new model family is a new denoiser, not a new sampler."""
