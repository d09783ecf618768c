"""The tool-augmented annotation pipeline (paper §3.1, App. A): build a ToolFAS-style trajectory
dataset from a manifest of labelled images.

For each image: a multi-turn conversation with an annotator (eqs. 1-5: Fig. S8 system prompt; the face,
"This is the image you need to investigate." and the hint; then each requested tool's image with the
expert guidance, until the annotator answers or L_max = 6 reasoning turns), verified for correctness,
format and leakage (§3.1.3), re-annotated once on failure, then accepted or discarded as a bad case.

- :mod:`.conversation`: one conversation, run by the agent loop (:mod:`core.agent`) with the annotator
  as policy and :class:`core.protocol.AnnotationPrompts`; the accepted one as the training trajectory;
- :mod:`.pipeline`: the run: annotate, verify (:mod:`training.verify`), re-annotate, resume, in parallel;
- :mod:`.outputs`: the dataset records, rejected.jsonl, review_queue.jsonl and stats.json.

The output folder is a :mod:`core.dataset` folder (source "annotation") that ``tarfas train sft`` reads.
Each accepted annotation is written as the inference-format trajectory the agent would have produced
(fast answer, think/tool_call turns with the tool images, answer): the hint and the expert guidance are
not in it. The raw annotator conversation is kept in the record's ``meta["annotation"]`` for audit.
:func:`app.review_queue.import_review_queue` puts the review queue into the workbench's storage.
"""

from ..annotators import resolve_annotator
from .conversation import L_MAX, annotate_image, annotator_messages, training_view
from .outputs import (
    REJECTED,
    REVIEW_QUEUE,
    STATS,
    dataset_stats,
    queued_trajectories,
    sample_id,
    write_review_queue,
    write_stats,
)
from .pipeline import (
    SOURCE,
    AnnotateConfig,
    RunSummary,
    SampleResult,
    annotate_sample,
    describe,
    load_rows,
    run_annotation,
)

__all__ = [
    "AnnotateConfig",
    "RunSummary",
    "SampleResult",
    "annotate_image",
    "annotate_sample",
    "run_annotation",
    "training_view",
    "annotator_messages",
    "resolve_annotator",
    "dataset_stats",
    "write_stats",
    "write_review_queue",
    "queued_trajectories",
    "load_rows",
    "describe",
    "sample_id",
    "L_MAX",
    "SOURCE",
    "REJECTED",
    "REVIEW_QUEUE",
    "STATS",
]
