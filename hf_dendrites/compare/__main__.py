"""`python -m hf_dendrites.compare ...` runs `hf-dendrites compare`."""

from . import main

raise SystemExit(main())
