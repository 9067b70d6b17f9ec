"""Per-source cleaners of the LLaMA data recipe (paper section 2.1), each a datatrove pipeline:
a reader for the source's raw format, then our cleaning steps (data_prep/sources/<source>.py), then
a JSONL writer. `data_prep.clean` builds and runs them from the `recipes/clean.yaml` config.
"""


class InputError(ValueError):
    """A raw input file is missing, corrupt or unreadable; the message names it."""
