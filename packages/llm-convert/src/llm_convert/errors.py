"""The one error type of llm-convert: its message names the file and tensor at fault."""


class ConversionError(ValueError):
    pass
