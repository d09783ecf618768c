"""The tool registry: the one place that knows tool names, their JSON Schemas (what the model sees, in
the Hermes / Qwen2.5 function format), how a model's call is validated and executed, and the facts about
each tool that the rest of tarfas uses (its family, whether an expert CNN reads it, its default
arguments, and the words the expert policy and the offline annotator use for what it shows).

Mirrors verl's ``BaseTool``: a tool is its schema plus an ``execute``; the agent loop only talks to
the registry, and every way a call can be wrong becomes a :class:`~core.errors.ToolCallError` whose
message is fed back to the model. A registry built with ``readers`` (an expert bank) also returns the
expert's reading of each tool image, so the loop never knows about experts.

Adding a tool: its pure function in :mod:`core.tools` and its :class:`ToolSpec` below (and, when
``has_expert``, expert weights from ``tarfas train experts``). Nothing else names tools.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema
import numpy as np

from . import tools
from .errors import InvalidToolArgumentsError, UnknownToolError

MIN_ZOOM_SIDE = 8  # pixels of the 224 crop: below this there is nothing left to see
FAMILIES = ("zoom", "frequency", "texture", "structure")  # paper Table 2 groups, in its order


@dataclass(frozen=True)
class ToolSpec:
    """Everything tarfas knows about one tool."""

    name: str
    description: str  # what the model reads in the tool schema
    parameters: dict  # JSON Schema of the arguments object
    family: str  # one of FAMILIES
    run: Callable[[np.ndarray, dict], tools.ToolOutput]
    purpose: str  # why one calls it, completing "Next I use <tool> ..."
    seen: tuple[str, str]  # what its output shows in words: (a spoof trace seen, no trace seen)
    has_expert: bool = True  # an expert CNN is trained on its output (paper Fig. S9; none for ZoomIn)
    default_args: dict = field(default_factory=dict)  # the call a policy makes when it has no reason to choose
    reader: str = "the expert"  # who reads its output, in the expert policy's words
    check: Callable[[np.ndarray, dict], dict] | None = None  # validates and normalises arguments beyond the schema

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family {self.family!r} is not one of {FAMILIES}")

    def schema(self) -> dict:
        """The function description in the OpenAI / Hermes tool format."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass
class ToolExecution:
    """A validated, executed call: the normalised arguments actually used, the output, and the expert's
    reading of the output when the registry has readers (None otherwise, or when no expert reads it)."""

    name: str
    arguments: dict
    output: tools.ToolOutput
    elapsed_ms: float
    expert_p_spoof: float | None = None
    reading_ms: float = 0.0


class Reader(Protocol):
    """What reads tool images (:class:`core.experts.ExpertBank`): P(spoof trace), or None for a tool it
    has no expert for."""

    def p_spoof(self, tool_name: str, image: np.ndarray) -> float | None: ...


_NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}


def _zoom(image: np.ndarray, args: dict) -> tools.ToolOutput:
    return tools.zoom_in(image, args["bbox"])


def _validate_bbox(image: np.ndarray, args: dict) -> dict:
    """Clamp the box to the image; refuse boxes that end up outside or too small."""
    h, w = image.shape[:2]
    if not all(math.isfinite(v) for v in args["bbox"]):
        raise InvalidToolArgumentsError(f"ZoomInTool: bbox {args['bbox']} must hold finite numbers")
    x1, y1, x2, y2 = args["bbox"]
    if x2 <= x1 or y2 <= y1:
        raise InvalidToolArgumentsError(
            f"ZoomInTool: bbox {args['bbox']} must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1"
        )
    cx1, cy1 = max(0, int(round(x1))), max(0, int(round(y1)))
    cx2, cy2 = min(w, int(round(x2))), min(h, int(round(y2)))
    if cx2 <= cx1 or cy2 <= cy1:
        raise InvalidToolArgumentsError(
            f"ZoomInTool: bbox {args['bbox']} lies outside the {w}x{h} image; coordinates are pixels in 0..{w}"
        )
    if cx2 - cx1 < MIN_ZOOM_SIDE or cy2 - cy1 < MIN_ZOOM_SIDE:
        raise InvalidToolArgumentsError(
            f"ZoomInTool: bbox {args['bbox']} is {cx2 - cx1}x{cy2 - cy1} pixels inside the image; "
            f"each side must be at least {MIN_ZOOM_SIDE}"
        )
    return {"bbox": [cx1, cy1, cx2, cy2]}


def _whole_image(
    name: str, description: str, family: str, fn: Callable[[np.ndarray], tools.ToolOutput], **facts
) -> ToolSpec:
    """A tool of the whole crop, without arguments (``fn(image)``)."""
    return ToolSpec(name, description, _NO_ARGS, family, lambda image, _: fn(image), **facts)


SPECS: list[ToolSpec] = [
    ToolSpec(
        "ZoomInTool",
        "Inspect local details for physical (print/screen) or digital (blending) artifacts. "
        "Crops the given box of the 224x224 face image and enlarges it.",
        {
            "type": "object",
            "properties": {
                "bbox": {
                    "type": "array",
                    "items": {"type": "number"},
                    "minItems": 4,
                    "maxItems": 4,
                    "description": "[x1, y1, x2, y2] in pixels of the 224x224 face image (origin top-left)",
                }
            },
            "required": ["bbox"],
            "additionalProperties": False,
        },
        "zoom",
        _zoom,
        purpose="to inspect the cheeks and nose up close for print dots, paper grain or screen pixels",
        seen=(
            "print dots, paper grain or screen pixels on the cheeks and nose",
            "natural pores and fine skin detail on the cheeks and nose",
        ),
        has_expert=False,  # paper §3.1.2: its output is a view of the face, read by the RGB network
        default_args={"bbox": [56, 72, 168, 184]},  # cheeks and nose of the aligned 224 crop
        reader="the RGB network on the enlarged region",
        check=_validate_bbox,
    ),
    _whole_image(
        "FFTTool",
        "Fast Fourier Transform: visualizes the image's frequency domain. Used to detect periodic "
        "patterns like screen Moire effects or subtle artifacts from digital generation.",
        "frequency",
        tools.fft_spectrum,
        purpose="to look for periodic peaks of screen moire or print halftone in the spectrum",
        seen=(
            "periodic peaks in the spectrum, typical of screen moire or print halftone",
            "a smooth spectrum without periodic peaks",
        ),
    ),
    _whole_image(
        "LBPTool",
        "Local Binary Patterns: analyze skin texture for unnatural or synthetic patterns.",
        "texture",
        tools.lbp_texture,
        purpose="to look for paper grain or screen texture in the skin micro-texture",
        seen=(
            "a regular, grainy micro-texture like paper or a screen surface",
            "an irregular micro-texture typical of live skin",
        ),
    ),
    _whole_image(
        "WaveletTransformTool",
        "Find subtle digital tampering or noise mismatches via multi-scale wavelet analysis.",
        "frequency",
        tools.wavelet_detail,
        purpose="to compare the fine-scale noise with natural camera noise",
        seen=(
            "fine-scale noise that does not look like natural camera noise",
            "fine-scale detail consistent with natural camera noise",
        ),
    ),
    _whole_image(
        "EdgeDetectionTool",
        "Laplacian edge detection: find inconsistent edges from cutouts or digital blending.",
        "structure",
        tools.laplacian_edges,
        purpose="to look for blurred fine edges of a recapture or straight paper/bezel borders",
        seen=("soft, blurred fine edges and flat regions typical of a recapture", "crisp, natural facial edges"),
    ),
    _whole_image(
        "HOGTool",
        "Histogram of Oriented Gradients: check facial structure gradients, which are often "
        "disrupted in physical attacks.",
        "structure",
        tools.hog_visualization,
        purpose="to check whether the facial gradient structure looks flattened",
        seen=(
            "a flattened gradient structure that lacks 3D relief",
            "a coherent gradient structure with natural 3D relief",
        ),
    ),
]
_BY_NAME = {spec.name: spec for spec in SPECS}


def tool_spec(name: str) -> ToolSpec:
    """The spec of any known tool, offered or not (e.g. to describe a stored tool result)."""
    if name not in _BY_NAME:
        raise UnknownToolError(f"unknown tool {name!r}; known tools: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


class ToolRegistry:
    """Tools by name. ``allowed`` restricts the set (the paper's Table 2 ablation); ``readers`` (an
    expert bank) reads every tool output, and its P(spoof trace) comes back with the execution."""

    def __init__(self, allowed: list[str] | None = None, *, readers: Reader | None = None):
        unknown = sorted(set(allowed or []) - set(_BY_NAME))
        if unknown:
            raise ValueError(f"unknown tools {unknown}; known: {list(_BY_NAME)}")
        self._specs = {n: s for n, s in _BY_NAME.items() if allowed is None or n in allowed}
        self.readers = readers

    def only(self, allowed: list[str] | None) -> ToolRegistry:
        """The same registry (same readers) restricted to ``allowed`` (None: unchanged)."""
        if allowed is None:
            return self
        missing = sorted(set(allowed) - set(self._specs))
        if missing:
            raise ValueError(f"tools {missing} are not offered by this registry; offered: {self.names}")
        return ToolRegistry(allowed, readers=self.readers)

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> ToolSpec:
        if name not in self._specs:
            raise UnknownToolError(f"unknown tool {name!r}; available tools: {', '.join(self._specs)}")
        return self._specs[name]

    def schemas(self) -> list[dict]:
        return [spec.schema() for spec in self._specs.values()]

    def validate(self, name: Any, arguments: Any, image: np.ndarray) -> dict:
        """Check a call against its schema and the image; return the normalised arguments."""
        if not isinstance(name, str):
            raise UnknownToolError(f"tool name must be a string, got {type(name).__name__}")
        spec = self.spec(name)  # raises UnknownToolError for a name not offered
        if arguments is None:
            arguments = {}
        # Same error as jsonschema.validate(), without re-checking the schema on every call (2.5 ms).
        exc = jsonschema.exceptions.best_match(_VALIDATORS[name].iter_errors(arguments))
        if exc is not None:
            where = "/".join(str(p) for p in exc.absolute_path) or "arguments"
            raise InvalidToolArgumentsError(f"{name}: invalid {where}: {exc.message}")
        return spec.check(image, arguments) if spec.check else dict(arguments)

    def execute(self, name: Any, arguments: Any, image: np.ndarray) -> ToolExecution:
        """Validate and run one call on the face crop, then let the readers read the output.
        Raises ToolCallError for a bad call."""
        args = self.validate(name, arguments, image)
        t0 = time.perf_counter()
        output = self._specs[name].run(image, args)
        t1 = time.perf_counter()
        p = self.readers.p_spoof(name, output.image) if self.readers is not None else None
        return ToolExecution(name, args, output, (t1 - t0) * 1e3, p, (time.perf_counter() - t1) * 1e3)


def _validator(schema: dict):
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


_VALIDATORS = {spec.name: _validator(spec.parameters) for spec in SPECS}
TOOL_NAMES = [spec.name for spec in SPECS]
TOOL_FAMILIES = {spec.name: spec.family for spec in SPECS}
