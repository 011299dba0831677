"""`python -m idlora_trl_app.cli sft ...`: what `accelerate launch -m idlora_trl_app.cli` runs."""

from . import main

main()
