"""hf_dendrites' logging follows transformers' verbosity.

The library logs through standard `logging` loggers under the name `hf_dendrites`. A script that sets
transformers' verbosity (`transformers.logging.set_verbosity_info()`, or the Trainer from `--log_level`) expects
to see the library's lines at that level too, so `DendriticTrainer` calls `follow_transformers_verbosity()` when it
is built and when training starts: transformers' verbosity is the one switch for both libraries. It applies the level
first thing when it is built (the level the Trainer is about to set from `log_level`), before it converts the model,
so the conversion's lines (e.g. the dendrites restored from a checkpoint) are not lost.
"""

from __future__ import annotations

import logging

import transformers

LIBRARY_LOGGER_NAME = "hf_dendrites"
_HANDLER_NAME = "hf_dendrites_default"


def follow_transformers_verbosity(level: int | None = None) -> None:
    """Set the `hf_dendrites` logger's level to transformers' verbosity (or to `level`: the one a Trainer is about to
    give transformers, from `TrainingArguments.get_process_log_level()`).

    When nothing would print the records (no handler on the way to the root logger, as in a script that never
    configured `logging`), a stderr handler is added once, as transformers does for its own logger.
    """
    library = logging.getLogger(LIBRARY_LOGGER_NAME)
    library.setLevel(transformers.logging.get_verbosity() if level is None else level)
    if not library.hasHandlers():
        handler = logging.StreamHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
        library.addHandler(handler)
