"""The built-in text encoders' plugin: registers ``open_clip``, ``hf`` and ``minilm``.

Kept apart from :mod:`lgvq_plugins.text.encoders` (the shared base class) so the encoders
import the base and this module imports the encoders, with no circle. open_clip and
transformers themselves load only when an encoder is built.
"""

from __future__ import annotations

from typing import Any

from lgvq_plugins.hookspecs import hookimpl
from lgvq_plugins.text.clip import OpenCLIPTextEncoder
from lgvq_plugins.text.hf import HFTextEncoder, minilm


@hookimpl
def register_text_encoders(register: Any) -> None:
    register("open_clip", OpenCLIPTextEncoder)
    register("hf", HFTextEncoder)
    register("minilm", minilm)
