"""FormatError: the one exception for a damaged, truncated or malformed container."""


class FormatError(ValueError):
    """A container that is truncated, corrupted or not a kvpack container; the message names the
    section or block. Decoders raise it instead of ever returning wrong tensors."""
