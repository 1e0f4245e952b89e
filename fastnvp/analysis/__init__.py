"""Analysis: latent statistics, figures, the depth study, profiling and memory probes."""
