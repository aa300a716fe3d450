"""The one rule for a model's name, wherever a name enters (pure).

A model name becomes a directory of the served repository (``targets/<name>/``), the
first component of every target path of the model (``<name>/<name>-<version>.tar``,
``...tar.chunks.json``), a directory of the device's state, an MQTT topic level and a
word the operator's tools print. So it is one path component, printable ASCII, no MQTT
wildcard and no ``/``: the agent configuration's rule for names
(``agent._config_schema``), which ``bundle build``, the manifest parser (publisher and
device alike) and the served-path writers all apply.
"""

from __future__ import annotations

import re

#: Letters, digits, ``.``, ``_``, ``-``; at most 128; starting with a letter or digit
#: (so never ``.``, ``..`` or a hidden name, never a leading ``-`` read as an option).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_model_name(name: object) -> str:
    """``name`` if it is a usable model name.

    Raises:
        ValueError: it is not (the message shows it as ASCII, via ``ascii``, cut).
    """
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        shown = ascii(name) if len(ascii(name)) <= 80 else ascii(name)[:77] + "..."
        raise ValueError(f"model name {shown} must be letters, digits, '.', '_' or '-' (at "
                         "most 128), starting with a letter or digit")
    return name
