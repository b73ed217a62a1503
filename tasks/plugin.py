"""Built-in evaluation tasks and FID feature extractors (a plugin like any other).

Tasks (``task`` registry; gin module ``lgvq.task``): ``reconstruction``,
``masked_word_prediction``, ``code_word_alignment``, ``retrieval``, and the downstream
``unconditional``, ``completion``, ``text_to_image``, ``semantic_synthesis``, ``captioning``,
``vqa``, ``grounding``.
Metric networks (``metric`` registry; gin module ``lgvq.metric``): ``inception`` and
``shapes_probe`` (FID features), ``shapes_segmenter`` (mIoU of semantic synthesis).
"""

from __future__ import annotations

from lgvq_plugins.tasks.captioning import Captioning
from lgvq_plugins.tasks.code_word import CodeWordAlignment
from lgvq_plugins.tasks.completion import Completion
from lgvq_plugins.tasks.features import InceptionFeatures, ShapesProbe
from lgvq_plugins.tasks.grounding import Grounding
from lgvq_plugins.tasks.masked_words import MaskedWordPrediction
from lgvq_plugins.tasks.reconstruction import Reconstruction
from lgvq_plugins.tasks.retrieval import Retrieval
from lgvq_plugins.tasks.segmenter import ShapesSegmenter
from lgvq_plugins.tasks.semantic_synthesis import SemanticSynthesis
from lgvq_plugins.tasks.text_to_image import TextToImage
from lgvq_plugins.tasks.unconditional import Unconditional
from lgvq_plugins.tasks.vqa import VQA

from lgvq_plugins.hookspecs import hookimpl


@hookimpl
def register_tasks(register):
    register("reconstruction", Reconstruction)
    register("masked_word_prediction", MaskedWordPrediction)
    register("code_word_alignment", CodeWordAlignment)
    register("retrieval", Retrieval)
    register("unconditional", Unconditional)
    register("completion", Completion)
    register("text_to_image", TextToImage)
    register("semantic_synthesis", SemanticSynthesis)
    register("captioning", Captioning)
    register("vqa", VQA)
    register("grounding", Grounding)


@hookimpl
def register_metrics(register):
    register("inception", InceptionFeatures)
    register("shapes_probe", ShapesProbe)
    register("shapes_segmenter", ShapesSegmenter)
