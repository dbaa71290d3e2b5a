"""Generative LightningModules: a GAN and a diffusion model behind one base, picked by ``model.class_path``.

The classes live in :mod:`domains.media.task` (:class:`GenerativeTask`, what both share),
:mod:`domains.media.gan` and :mod:`domains.media.diffusion`; this module names them for configs
and checkpoints (``class_path: domains.media.model.GAN`` / ``domains.media.model.Diffusion``).
"""

from domains.media.diffusion import Diffusion, ddim_schedule
from domains.media.gan import GAN
from domains.media.task import GenerativeTask, NonFiniteLossError, seeded_noise

__all__ = ["GAN", "Diffusion", "GenerativeTask", "NonFiniteLossError", "ddim_schedule", "seeded_noise"]
