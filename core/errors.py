"""Typed errors. Each carries a message a person (or a model, for tool errors) can act on."""


class TarfasError(Exception):
    """Base class of every error tarfas raises on purpose."""


# --- input images -----------------------------------------------------------------------------
class InputImageError(TarfasError):
    """The input could not be turned into a face crop."""


class InvalidImageError(InputImageError):
    """The file is not an image, or is corrupt or truncated."""


class ImageTooLargeError(InputImageError):
    """The image has more pixels than the configured cap (decompression-bomb guard)."""


class NoFaceError(InputImageError):
    """No face was detected; the caller may choose to analyse the whole image instead."""


# --- tools ------------------------------------------------------------------------------------
class ToolCallError(TarfasError):
    """A tool call the model made cannot be executed. The message is fed back to the model."""


class UnknownToolError(ToolCallError):
    pass


class InvalidToolArgumentsError(ToolCallError):
    pass


# --- protocol ---------------------------------------------------------------------------------
class ProtocolParseError(TarfasError):
    """Model output that does not follow the CoT-VT format. The message is fed back to the model."""


# --- weights ----------------------------------------------------------------------------------
class WeightsError(TarfasError):
    """Shipped or user-supplied weights are missing or do not match the expected layout."""
