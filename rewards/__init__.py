"""r1kit rewards: rule-based reward functions with the TRL-compatible signature, and their registry.

Importable on its own (no trainer needed): `import rewards; rewards.get("accuracy")(completions, prompts, answer=...)`.
Built-ins: accuracy, format, language, code, overlong, cosine, repetition.
"""

from rewards.registry import get, names, register, resolve  # noqa: F401
from rewards import accuracy as _accuracy, format as _format  # noqa: F401,E402  (registers the built-ins)
from rewards import code as _code, language as _language, shaping as _shaping  # noqa: F401,E402
from rewards.runner import RewardSet  # noqa: F401,E402
