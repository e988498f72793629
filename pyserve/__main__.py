"""`python -m pyserve`: see pyserve/cli.py."""
from pyserve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
