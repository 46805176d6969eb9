"""The CrowNest API's wire shapes as TypedDicts and Literals, generated
from docs/openapi.json (``_types.py``; ``tools/gen_types.py``): what
``Record.to_dict()`` returns, what ``usage.get()`` returns, and the
statuses the SDK's signatures name (``SandboxStatus``, ``CommandStatus``,
…)."""

from ._types import *  # noqa: F403
from ._types import __all__  # noqa: F401
