"""Trainers: one module per method, each with its config model and its trainer class.

``METHODS`` maps the ``method:`` value of a config to the module that defines it; importing this
package imports them, and each registers its config class and trainer with
``diffalign.config.register_method``. Trainer modules import no model weights at import time.
"""

from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "diffusion_dpo": "diffalign.trainers.diffusion_dpo",
    "adjoint_matching": "diffalign.trainers.adjoint_matching",
    "draft": "diffalign.trainers.draft",
    "self_npo": "diffalign.trainers.npo",
    "d3po": "diffalign.trainers.d3po",
    "grpo": "diffalign.trainers.pref_grpo",
    "pref_grpo": "diffalign.trainers.pref_grpo",
    "diffusion_nft": "diffalign.trainers.diffusion_nft",
}

for _module in sorted(set(METHODS.values())):
    importlib.import_module(_module)
