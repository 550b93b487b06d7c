"""Built-in synthetic ultrasound, kept at its documented path; the generator is urfm_fast.data.synthetic."""

from urfm_fast.data.synthetic import *  # noqa: F401,F403
from urfm_fast.data.synthetic import __all__  # noqa: F401
