"""`python -m jaxbp`: the same command as the `jaxbp` console script."""
from jaxbp.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
