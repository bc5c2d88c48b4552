"""``python -m patchflannel.cli``."""

from patchflannel.cli import main

main()
