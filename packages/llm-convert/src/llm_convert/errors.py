"""The one error type of llm-convert: its message names the file and tensor at fault."""


class ConversionError(ValueError):
    pass


def require_values(cfg, needed: dict, family: str) -> None:
    """ConversionError naming the first config key whose value the HF `family` cannot express."""
    for key, value in needed.items():
        if getattr(cfg, key) != value:
            raise ConversionError(
                f"transformers' {family} cannot express {key}={getattr(cfg, key)!r}: it needs "
                f"{value!r}."
            )
