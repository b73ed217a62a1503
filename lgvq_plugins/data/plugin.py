"""Built-in plugin registering the real-data readers (``shapes`` registers itself).

Readers are imported when the hook runs, not when this module is imported, so listing
plugins stays cheap."""

from __future__ import annotations

from lgvq_plugins.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    from lgvq_plugins.data.celeba import MMCelebAHQ
    from lgvq_plugins.data.coco import COCOQA, COCOCaptions
    from lgvq_plugins.data.cub import CUB200
    from lgvq_plugins.data.image_text import ImageTextDataset
    from lgvq_plugins.data.refcoco import RefCOCO
    from lgvq_plugins.data.textcaps import TextCaps

    register("image_text", ImageTextDataset)
    register("cub200", CUB200)
    register("mm_celeba_hq", MMCelebAHQ)
    register("coco_captions", COCOCaptions)
    register("coco_qa", COCOQA)
    register("textcaps", TextCaps)
    register("refcoco", RefCOCO)
    try:
        from lgvq_plugins.data.webdataset import WebDatasetCaptions
    except ImportError as exc:  # the other readers stay usable without the webdataset package
        register("webdataset", _missing_webdataset(exc))
    else:
        register("webdataset", WebDatasetCaptions)


def _missing_webdataset(exc: ImportError):
    def webdataset(*args, **kwargs):
        raise ImportError(f"the 'webdataset' data set needs the webdataset package ({exc}): "
                          "pip install webdataset") from exc

    return webdataset
