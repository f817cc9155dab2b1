"""The command line: fine-tune GPT-2 to tell spam from ham, ``python -m lora_tutorial.finetune``.

- :mod:`~lora_tutorial.finetune.options`: the options, and every check on them before a run;
- :mod:`~lora_tutorial.finetune.output_folder`: a run's results written as a unit;
- :mod:`~lora_tutorial.finetune.run`: one run, from the data to the files it writes.
"""

from lora_tutorial.finetune.options import parse_args
from lora_tutorial.finetune.run import main, run

__all__ = ["main", "parse_args", "run"]
