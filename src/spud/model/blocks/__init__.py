"""Built-in block types, one file each; importing this package registers them.

To add one: copy llama.py to a new file, change the class, register it under a new name with
`@register_block("name")`, and import it below (or name your own module in `model.plugins`).
See docs/architecture.md, "Write your own block".
"""

from spud.model.blocks import llama, parallel  # noqa: F401
