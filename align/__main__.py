from align.cli import main

main(prog_name="python -m align")
