"""The align_dataset command from a source checkout (`python cli.py INPUT_DIR OUTPUT_DIR ...`).

The command itself is `align.cli`: that is what `pip install` installs as `align_dataset`, so no
top-level module named `cli` lands in site-packages."""
from align.cli import main

if __name__ == "__main__":
    main()
