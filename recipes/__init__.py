"""Training recipes on accelerate (installed as ``dfm_ext.recipes``; the library never imports accelerate).

Modules: ``config`` (typed YAML configs and overrides), ``engine`` (the shared trainer),
``checkpointing`` (atomic checkpoints), ``data_images`` (image folders, resumable batch plan),
``latents`` (VAE codec, latent cache), ``imagenet`` and ``build_latent_cache`` (commands),
``tiny_assets`` (offline assets for the ``tiny`` config).
"""
