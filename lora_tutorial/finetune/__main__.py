"""``python -m lora_tutorial.finetune``: see :mod:`lora_tutorial.finetune.run`."""

import sys

from lora_tutorial.finetune.run import main

sys.exit(main())
