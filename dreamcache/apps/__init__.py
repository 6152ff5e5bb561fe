"""Applications of the pack built on the core and the ComfyUI glue: command lines, the headless workflow runner and
its ComfyUI client, training-data synthesis and the trainer."""
