"""`python -m hf_dendrites compare ...`: the library's command line (one subcommand, `compare`)."""

import sys

from .compare import main

if len(sys.argv) < 2 or sys.argv[1] != "compare":
    sys.stderr.write("usage: python -m hf_dendrites compare [--help] ...\n")
    raise SystemExit(2)
raise SystemExit(main(sys.argv[2:]))
