import sys

from rlhf_jax.cli import main

sys.exit(main())
