"""Training recipes on accelerate (installed as ``dfm_ext.recipes``; the library never imports it).

* ``engine/``: what every recipe shares, by job (trainer, parallel, checkpoint, config, data, cli).
* ``imagenet/``, ``kinetics/``, ``flux/``: one folder per recipe (task, data, tiny assets, configs).
* ``demo/``: the ``dfm-ext`` command; its training is a config of the image recipe.
"""


__all__ = []
