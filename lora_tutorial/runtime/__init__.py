"""What every part of the package stands on, and no chapter needs to read.

- :mod:`~lora_tutorial.runtime.checks`: the one family of checks on numbers users give;
- :mod:`~lora_tutorial.runtime.config`: the mode (quick / rehearsal / full), folders, device;
- :mod:`~lora_tutorial.runtime.files`: atomic writes, file digests, usable folders;
- :mod:`~lora_tutorial.runtime.download`: verified, cached downloads;
- :mod:`~lora_tutorial.runtime.rehearsal`: rehearsal mode's caps, run records and projections;
- :mod:`~lora_tutorial.runtime.distributed`: training on several processes (``torchrun``).
"""
