"""Random-weight models for tests and GPU checks, not backends of their own: the real architectures (SD1.5, SDXL,
SD3, FLUX, and the SD2-v / SD3.5 / FLUX-schnell variants) built offline from configs, tiny or full size
(:mod:`backends.testing.random_init`, :mod:`backends.testing.random_variants`). Cost does not depend on the
weights' values, so the full-size builds are what the GPU benchmarks time."""
