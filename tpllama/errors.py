"""Errors a user can act on. Their message is one line: what is wrong, where, and what to do."""


class TpllamaError(Exception):
    """A problem with the user's input or environment (bad file, bad flag, not enough memory)."""


class ModelFormatError(TpllamaError):
    """A model or tokenizer file that cannot be read as what it claims to be."""
