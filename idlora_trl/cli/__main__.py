"""`python -m idlora_trl.cli sft ...`: what `accelerate launch -m idlora_trl.cli` runs."""

from . import main

main()
