"""Errors a user can act on. Their message is one line: what is wrong, where, and what to do."""


class TpllamaError(Exception):
    """A problem with the user's input or environment (bad file, bad flag, not enough memory).

    collective: every rank of the job raised this same error (so rank 0 alone reports it and
    every rank can exit); otherwise it happened on this rank only and must abort the job."""

    def __init__(self, message: str, collective: bool = False):
        super().__init__(message)
        self.collective = collective


class ModelFormatError(TpllamaError):
    """A model or tokenizer file that cannot be read as what it claims to be."""
