"""cnds: a compiler for deeply supervised convolutional networks (Wang, Lee, Tu, Lazebnik 2015).

Checking a spec is pure Python; torch is imported only by ``cnds_compiler.backends`` and later stages.
"""

__version__ = "0.1.0"

from .errors import CndsError, install_warning_format  # noqa: E402
from .frontend import compile_spec, compile_text  # noqa: E402

install_warning_format()

__all__ = ["CndsError", "compile_spec", "compile_text", "__version__"]
