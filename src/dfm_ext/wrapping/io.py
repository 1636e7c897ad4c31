"""Saving and loading a :class:`~dfm_ext.wrapping.wrapper.DFMTransformer`: one folder, one config.

The format (``dfm_ext.wrapped/2``), written atomically (:func:`dfm_ext.fileio.atomic_directory`:
a crash never leaves a half-written folder)::

    <dir>/dfm_config.json               format, decomposition (factory config), adapter (name,
                                        class and config incl. time_convention), base model (class
                                        + config), sample/stage shapes, patch sizes, stage scales,
                                        whether any sample shape is accepted, specialisation record
    <dir>/model.safetensors             every shared weight (and the stage_scales buffer)
    <dir>/stage_parameters.safetensors  only for a specialised model (named in the config)
    <dir>/<extra files>                 named in the config (``extra_files=``, e.g. a recipe's
                                        label-token weights)

Older layouts written by released versions still load through :func:`load_wrapped`:

* ``dfm_ext.wrapped/1``: the same two files without scales and specialisation record, with an
  optional specialisation beside them (``stage_parameters.safetensors`` + ``stage_lora.json``,
  kinds ``lora`` and ``full``) and, for Kinetics ``final/`` folders, ``video_dfm.safetensors``
  holding the ``stage_scales`` (its ``stage_scales.json`` repeats them).
* the demo's ``config.json`` checkpoints are not wrapped models: the error points to the demo's loader.

Weights are read with safetensors only (no pickle). This module gathers the public names: the
files themselves are written and read by :mod:`dfm_ext.wrapping.record` (which never imports the
wrapper), and :func:`load_wrapped` lives with :func:`~dfm_ext.wrapping.wrapper.wrap_dit`, which it
calls; imports run one way (io -> wrapper -> record), so there is no import loop.
"""

from __future__ import annotations

from dfm_ext.wrapping.record import (
    CONFIG_FILE,
    FORMAT,
    WEIGHTS_FILE,
    describe_mismatch,
    peft_merged,
    read_json_file,
    save_pretrained,
)
from dfm_ext.wrapping.wrapper import load_wrapped

__all__ = [
    "FORMAT", "CONFIG_FILE", "WEIGHTS_FILE", "save_pretrained", "load_wrapped", "describe_mismatch", "peft_merged",
    "read_json_file",
]  # fmt: skip
