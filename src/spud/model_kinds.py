"""Which models a run directory can hold, and where each lives (kept import-light: the CLI
builds its --model choices from it without loading torch).

The pretrained (base) model lives in RUN itself; each post-training stage writes a run
directory of its own inside RUN (`spud sft` → RUN/chat/). A later stage is one more entry,
e.g. "rl": "rl"; every --model flag and spud.runs.choose_model follow this mapping.
"""

from __future__ import annotations

MODEL_DIRS: dict[str, str] = {"base": "", "chat": "chat", "rl": "rl", "dpo": "dpo", "vlm": "vlm"}
MODELS: tuple[str, ...] = tuple(MODEL_DIRS)
# Models fine-tuned on the chat template (their prompts are chat-rendered); "base" continues text.
CHAT_MODELS: tuple[str, ...] = ("chat", "rl", "dpo", "vlm")  # vlm: a chat model that also reads images
