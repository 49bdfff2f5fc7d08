"""Host glue that is not a node: the SDXL check and LoRA patching, the training clone, progress,
HTTP routes, the run both training nodes share, and the one place host versions differ
(``compat``). Nodes import from here; nothing here imports ``nodes``."""
