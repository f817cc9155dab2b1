"""What the book's pages show around the lessons; nothing in the teaching modules imports it.

- :mod:`~lora_tutorial.book.provenance`: the mode banner and where a chapter's numbers come from;
- :mod:`~lora_tutorial.book.display`: the package's real source on a page, and glued numbers;
- :mod:`~lora_tutorial.book.plots`: the book's figures; :mod:`~lora_tutorial.book.diagrams`: its
  diagrams (with alt text).
"""
