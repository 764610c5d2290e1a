"""``python -m moe_sieve.cli`` (what ``torchrun -m`` and ``accelerate launch -m`` run)."""

from . import main

if __name__ == "__main__":
    main()
