"""Built-in plugin registering the real-data readers (``shapes`` registers itself)."""

from __future__ import annotations

from lgvq_plugins.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    from lgvq_plugins.data.image_text import ImageTextDataset

    register("image_text", ImageTextDataset)
