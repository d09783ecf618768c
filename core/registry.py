"""The tool registry: the one place that knows tool names, their JSON Schemas (what the model sees, in
the Hermes / Qwen2.5 function format) and how a model's call is validated and executed.

Mirrors verl's ``BaseTool``: a tool is its schema plus an ``execute``; the agent loop only talks to
the registry, and every way a call can be wrong becomes a :class:`~core.errors.ToolCallError` whose
message is fed back to the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
import numpy as np

from . import tools
from .errors import InvalidToolArgumentsError, UnknownToolError

MIN_ZOOM_SIDE = 8  # pixels of the 224 crop: below this there is nothing left to see


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict  # JSON Schema of the arguments object
    family: str  # "zoom" | "frequency" | "texture" | "structure" (paper Table 2 groups)
    run: Callable[[np.ndarray, dict], tools.ToolOutput]

    def schema(self) -> dict:
        """The function description in the OpenAI / Hermes tool format."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass
class ToolExecution:
    """A validated, executed call: the normalised arguments actually used, and the output."""

    name: str
    arguments: dict
    output: tools.ToolOutput
    elapsed_ms: float


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


_SPECS: list[tuple[ToolSpec, Callable[[np.ndarray, dict], dict] | None]] = [
    (
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
        ),
        _validate_bbox,
    ),
    (
        ToolSpec(
            "FFTTool",
            "Fast Fourier Transform: visualizes the image's frequency domain. Used to detect periodic "
            "patterns like screen Moire effects or subtle artifacts from digital generation.",
            _NO_ARGS,
            "frequency",
            lambda image, _: tools.fft_spectrum(image),
        ),
        None,
    ),
    (
        ToolSpec(
            "LBPTool",
            "Local Binary Patterns: analyze skin texture for unnatural or synthetic patterns.",
            _NO_ARGS,
            "texture",
            lambda image, _: tools.lbp_texture(image),
        ),
        None,
    ),
    (
        ToolSpec(
            "WaveletTransformTool",
            "Find subtle digital tampering or noise mismatches via multi-scale wavelet analysis.",
            _NO_ARGS,
            "frequency",
            lambda image, _: tools.wavelet_detail(image),
        ),
        None,
    ),
    (
        ToolSpec(
            "EdgeDetectionTool",
            "Laplacian edge detection: find inconsistent edges from cutouts or digital blending.",
            _NO_ARGS,
            "structure",
            lambda image, _: tools.laplacian_edges(image),
        ),
        None,
    ),
    (
        ToolSpec(
            "HOGTool",
            "Histogram of Oriented Gradients: check facial structure gradients, which are often "
            "disrupted in physical attacks.",
            _NO_ARGS,
            "structure",
            lambda image, _: tools.hog_visualization(image),
        ),
        None,
    ),
]


class ToolRegistry:
    """Tools by name. ``allowed`` restricts the set (the paper's Table 2 ablation)."""

    def __init__(self, allowed: list[str] | None = None):
        specs = {spec.name: (spec, check) for spec, check in _SPECS}
        unknown = sorted(set(allowed or []) - set(specs))
        if unknown:
            raise ValueError(f"unknown tools {unknown}; known: {list(specs)}")
        self._specs = {n: specs[n] for n in specs if allowed is None or n in allowed}

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> ToolSpec:
        if name not in self._specs:
            raise UnknownToolError(f"unknown tool {name!r}; available tools: {', '.join(self._specs)}")
        return self._specs[name][0]

    def schemas(self) -> list[dict]:
        return [spec.schema() for spec, _ in self._specs.values()]

    def validate(self, name: Any, arguments: Any, image: np.ndarray) -> dict:
        """Check a call against its schema and the image; return the normalised arguments."""
        if not isinstance(name, str):
            raise UnknownToolError(f"tool name must be a string, got {type(name).__name__}")
        self.spec(name)  # raises UnknownToolError for a name not offered
        if arguments is None:
            arguments = {}
        # Same error as jsonschema.validate(), without re-checking the schema on every call (2.5 ms).
        exc = jsonschema.exceptions.best_match(_VALIDATORS[name].iter_errors(arguments))
        if exc is not None:
            where = "/".join(str(p) for p in exc.absolute_path) or "arguments"
            raise InvalidToolArgumentsError(f"{name}: invalid {where}: {exc.message}")
        check = self._specs[name][1]
        return check(image, arguments) if check else dict(arguments)

    def execute(self, name: Any, arguments: Any, image: np.ndarray) -> ToolExecution:
        """Validate and run one call on the face crop. Raises ToolCallError for a bad call."""
        args = self.validate(name, arguments, image)
        t0 = time.perf_counter()
        output = self._specs[name][0].run(image, args)
        return ToolExecution(name, args, output, (time.perf_counter() - t0) * 1e3)


def _validator(schema: dict):
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


_VALIDATORS = {spec.name: _validator(spec.parameters) for spec, _ in _SPECS}
TOOL_NAMES = [spec.name for spec, _ in _SPECS]
TOOL_FAMILIES = {spec.name: spec.family for spec, _ in _SPECS}
