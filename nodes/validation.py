"""Prompt-time validation of COMBO inputs.

ComfyUI 0.3.64 checks V1 list-typed combos when a prompt is queued but not V3 ``COMBO`` inputs, so a workflow
naming a missing adapter would only fail while running. Nodes declare ``validate_inputs`` with exactly their
combo inputs (never ``**kwargs``: ComfyUI then skips its own min/max checks for every input) and call
:func:`combo_check`, so a bad value is refused at /prompt with the node's own message.
"""
from __future__ import annotations


def combo_check(node_cls, **values):
    schema = node_cls.define_schema()  # GET_SCHEMA would set class attributes, and ComfyUI locks its per-run clones
    specs = {i.id: i for i in schema.inputs}
    for name, value in values.items():
        options = getattr(specs.get(name), "options", None)
        if options is None or value in options:
            continue
        custom = getattr(node_cls, "combo_error", None)
        if custom is not None:
            message = custom(name, value)
            if message:
                return message
        shown = ", ".join(map(str, options[:12])) + (" ..." if len(options) > 12 else "")
        return f"{name}: '{value}' is not one of the choices ({shown or 'none available'})."
    return True
