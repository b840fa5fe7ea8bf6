"""`python -m moectl` is the same as the `moectl` command (and what torchrun launches)."""

from moectl.cli import main

if __name__ == "__main__":
    main()
