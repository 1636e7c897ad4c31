"""Training recipes on accelerate (installed as ``dfm_ext.recipes``; the library never imports accelerate).

Modules: ``config`` (typed YAML configs and overrides), ``sections`` (the config sections recipes
share), ``engine`` (the shared trainer loop) with ``train_config`` (its ``train``/``optim``
sections and task contract), ``optimizer`` (AdamW, warmup, EMA), ``run_folder`` (output folder,
resume decisions), ``checkpointing`` (atomic checkpoints) and ``sharding`` (FSDP2);
``data_images`` (image folders, resumable batch plan), ``latents`` (VAE codec, latent cache),
``imagenet``, ``kinetics``, ``flux_finetune`` and the cache builders (commands); the demo
(``demo`` with ``demo_config``, ``demo_model``, ``demo_train``, ``demo_eval``, ``demo_files``);
``tiny_assets`` (offline assets for the ``tiny`` config).
"""
