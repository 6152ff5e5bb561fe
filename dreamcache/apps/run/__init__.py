"""``python -m dreamcache``: the pack's command line (:mod:`.cli`: convert, info, run) and the headless runner of
shipped workflows (:mod:`.runner`) with its ComfyUI server client (:mod:`.comfy_client`) and the workflow-file
conversions (:mod:`.workflow`)."""
