"""`python -m moecl ...`: the command line, also as torchrun's entry point (`torchrun ... -m moecl train ...`)."""
import sys

from .cli import main

sys.exit(main())
