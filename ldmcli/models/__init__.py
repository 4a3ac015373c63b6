"""Networks of the latent diffusion models (Rombach et al., CVPR 2022), laid out so upstream checkpoints load as is."""
