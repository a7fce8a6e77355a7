"""`python -m chute`: the same as the `chute` command (`python -m chute serve` runs a broker; the other
commands talk to one), for environments where the console script is not on PATH.
"""

from chute.cli import main

main()
