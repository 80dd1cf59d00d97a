"""The paper (Bar-Tal et al., 2023), torch only: the sampler, views, fusion weights, guidance, noise schedules.

Nothing here reads files, YAML or tokenizers, or imports a model library: a new model family is a
new denoiser and schedule, not a new sampler."""
