"""The tool registry: the six tools of the paper by name, their Hermes/OpenAI schemas, and validated
execution where every way a model's call can be wrong is a typed ToolCallError with a usable message."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from core import tools
from core.errors import InvalidToolArgumentsError, TarfasError, ToolCallError, UnknownToolError
from core.registry import MIN_ZOOM_SIDE, TOOL_FAMILIES, TOOL_NAMES, ToolExecution, ToolRegistry

PAPER_TOOLS = ["ZoomInTool", "FFTTool", "LBPTool", "WaveletTransformTool", "EdgeDetectionTool", "HOGTool"]
NO_ARG_TOOLS = [n for n in PAPER_TOOLS if n != "ZoomInTool"]


@pytest.fixture(scope="module")
def registry() -> ToolRegistry:
    return ToolRegistry()


# --- names and schemas ----------------------------------------------------------------------------
def test_registry_offers_exactly_the_six_tools_of_the_paper(registry):
    assert sorted(registry.names) == sorted(PAPER_TOOLS)
    assert len(registry.names) == 6
    assert sorted(TOOL_NAMES) == sorted(PAPER_TOOLS)
    assert set(TOOL_FAMILIES) == set(PAPER_TOOLS)
    assert set(TOOL_FAMILIES.values()) <= {"zoom", "frequency", "texture", "structure"}


def test_schemas_are_hermes_function_dicts_with_valid_json_schemas(registry):
    schemas = registry.schemas()
    assert [s["function"]["name"] for s in schemas] == registry.names
    for s in schemas:
        assert set(s) == {"type", "function"}
        assert s["type"] == "function"
        fn = s["function"]
        assert set(fn) == {"name", "description", "parameters"}
        assert isinstance(fn["description"], str) and len(fn["description"]) > 20
        params = fn["parameters"]
        assert params["type"] == "object"
        jsonschema.validators.validator_for(params).check_schema(params)
    # the model reads them as JSON: they must survive a round trip unchanged
    assert json.loads(json.dumps(schemas)) == schemas


def test_zoom_schema_asks_for_a_four_number_bbox(registry):
    params = registry.spec("ZoomInTool").parameters
    assert params["required"] == ["bbox"]
    bbox = params["properties"]["bbox"]
    assert bbox["type"] == "array" and bbox["items"] == {"type": "number"}
    assert bbox["minItems"] == bbox["maxItems"] == 4
    assert params["additionalProperties"] is False


@pytest.mark.parametrize("name", NO_ARG_TOOLS)
def test_whole_image_tools_take_no_arguments(registry, name):
    params = registry.spec(name).parameters
    assert params["properties"] == {} and params["additionalProperties"] is False


# --- execution ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NO_ARG_TOOLS)
@pytest.mark.parametrize("arguments", [{}, None])
def test_execute_runs_each_whole_image_tool(registry, crop, name, arguments):
    ex = registry.execute(name, arguments, crop)
    assert isinstance(ex, ToolExecution)
    assert ex.name == name and ex.arguments == {}
    assert isinstance(ex.output, tools.ToolOutput)
    assert ex.output.image.dtype == np.uint8 and ex.output.image.shape[:2] == (224, 224)
    assert ex.elapsed_ms >= 0.0


def test_execute_runs_the_matching_tool_function(registry, crop):
    pairs = {
        "FFTTool": tools.fft_spectrum,
        "LBPTool": tools.lbp_texture,
        "WaveletTransformTool": tools.wavelet_detail,
        "EdgeDetectionTool": tools.laplacian_edges,
        "HOGTool": tools.hog_visualization,
    }
    for name, fn in pairs.items():
        expected = fn(crop)
        got = registry.execute(name, {}, crop).output
        assert np.array_equal(got.image, expected.image), name
        assert got.stats == expected.stats, name


def test_execute_zoom_in(registry, crop):
    ex = registry.execute("ZoomInTool", {"bbox": [20, 30, 120, 80]}, crop)
    assert ex.arguments == {"bbox": [20, 30, 120, 80]}
    assert ex.output.image.shape == (112, 224, 3)
    assert np.array_equal(ex.output.image, tools.zoom_in(crop, (20, 30, 120, 80)).image)


def test_zoom_in_accepts_float_coordinates_and_rounds_them(registry, crop):
    ex = registry.execute("ZoomInTool", {"bbox": [20.4, 30.6, 119.5, 80.2]}, crop)
    assert ex.arguments["bbox"] == [20, 31, 120, 80]
    assert all(isinstance(v, int) for v in ex.arguments["bbox"])


def test_partially_outside_bbox_is_clamped_and_the_clamped_box_is_returned(registry, crop):
    ex = registry.execute("ZoomInTool", {"bbox": [-20, -10, 100, 300]}, crop)
    assert ex.arguments == {"bbox": [0, 0, 100, 224]}
    assert np.array_equal(ex.output.image, tools.zoom_in(crop, (0, 0, 100, 224)).image)
    assert ex.output.stats["x1"] == 0 and ex.output.stats["y2"] == 224


def test_execute_does_not_modify_the_crop(registry, crop):
    before = crop.copy()
    for name in PAPER_TOOLS:
        registry.execute(name, {"bbox": [0, 0, 64, 64]} if name == "ZoomInTool" else {}, crop)
    assert np.array_equal(crop, before)


# --- errors ---------------------------------------------------------------------------------------
def test_error_classes_are_tool_call_errors():
    assert issubclass(UnknownToolError, ToolCallError)
    assert issubclass(InvalidToolArgumentsError, ToolCallError)
    assert issubclass(ToolCallError, TarfasError)


@pytest.mark.parametrize("name", ["MagicTool", "zoomintool", "", "FFT"])
def test_unknown_tool_names_the_available_tools(registry, crop, name):
    with pytest.raises(UnknownToolError) as info:
        registry.execute(name, {}, crop)
    message = str(info.value)
    assert repr(name) in message
    for known in PAPER_TOOLS:
        assert known in message


@pytest.mark.parametrize("name", [None, 3, ["FFTTool"]])
def test_a_tool_name_that_is_not_a_string_is_an_unknown_tool(registry, crop, name):
    with pytest.raises(UnknownToolError, match="string"):
        registry.execute(name, {}, crop)


BAD_ZOOM_ARGUMENTS = {
    "entirely outside": ({"bbox": [300, 300, 400, 400]}, "outside"),
    "outside to the left": ({"bbox": [-100, 0, -10, 50]}, "outside"),
    "inverted x": ({"bbox": [120, 10, 20, 100]}, "x2 > x1"),
    "inverted y": ({"bbox": [10, 120, 100, 20]}, "y2 > y1"),
    "empty": ({"bbox": [10, 10, 10, 100]}, "x2 > x1"),
    "too small": ({"bbox": [10, 10, 10 + MIN_ZOOM_SIDE - 1, 100]}, "at least 8"),
    "too small after clamping": ({"bbox": [-50, -50, 5, 100]}, "at least 8"),
    "three numbers": ({"bbox": [10, 10, 100]}, "bbox"),
    "five numbers": ({"bbox": [10, 10, 100, 100, 5]}, "bbox"),
    "strings": ({"bbox": ["10", "10", "100", "100"]}, "not of type 'number'"),
    "booleans": ({"bbox": [True, 0, 100, 100]}, "not of type 'number'"),
    "not a list": ({"bbox": "10,10,100,100"}, "not of type 'array'"),
    "missing bbox": ({}, "'bbox' is a required property"),
    "extra argument": ({"bbox": [10, 10, 100, 100], "scale": 2}, "scale"),
    "arguments not an object": ([10, 10, 100, 100], "not of type 'object'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ZOOM_ARGUMENTS))
def test_bad_zoom_arguments_are_refused_with_a_useful_message(registry, crop, case):
    arguments, fragment = BAD_ZOOM_ARGUMENTS[case]
    with pytest.raises(InvalidToolArgumentsError) as info:
        registry.execute("ZoomInTool", arguments, crop)
    message = str(info.value)
    assert message.startswith("ZoomInTool")
    assert fragment in message


def test_minimum_zoom_side_is_accepted(registry, crop):
    ex = registry.execute("ZoomInTool", {"bbox": [10, 10, 10 + MIN_ZOOM_SIDE, 10 + MIN_ZOOM_SIDE]}, crop)
    assert ex.output.image.shape == (224, 224, 3)


@pytest.mark.parametrize("text", ["[NaN, 0, 100, 100]", "[0, 0, Infinity, 100]", "[0, 0, 1e400, 100]"])
def test_non_finite_bbox_is_an_invalid_argument(registry, crop, text):
    bbox = json.loads(text)  # what parse_tool_call hands over for such model output
    with pytest.raises(InvalidToolArgumentsError, match="bbox"):
        registry.execute("ZoomInTool", {"bbox": bbox}, crop)


@pytest.mark.parametrize("name", NO_ARG_TOOLS)
def test_whole_image_tools_refuse_extra_arguments(registry, crop, name):
    with pytest.raises(InvalidToolArgumentsError) as info:
        registry.execute(name, {"bbox": [0, 0, 50, 50]}, crop)
    assert str(info.value).startswith(name)
    assert "bbox" in str(info.value)


# --- restricted sets (Table 2 ablation) -----------------------------------------------------------
def test_allowed_subset_restricts_the_tools(crop):
    reg = ToolRegistry(allowed=["FFTTool", "ZoomInTool"])
    assert sorted(reg.names) == ["FFTTool", "ZoomInTool"]
    assert sorted(s["function"]["name"] for s in reg.schemas()) == ["FFTTool", "ZoomInTool"]
    assert reg.execute("FFTTool", {}, crop).name == "FFTTool"
    with pytest.raises(UnknownToolError) as info:
        reg.execute("HOGTool", {}, crop)
    assert "FFTTool" in str(info.value) and "ZoomInTool" in str(info.value)
    assert "LBPTool" not in str(info.value)


def test_unknown_names_in_allowed_raise_value_error():
    with pytest.raises(ValueError, match="BogusTool"):
        ToolRegistry(allowed=["FFTTool", "BogusTool"])


def test_no_restriction_means_all_six():
    assert sorted(ToolRegistry(None).names) == sorted(PAPER_TOOLS)
