"""The file input of a loader node (DreamCache Loader, Load DreamCache Cache, DreamCache SAM Loader), described once:
its combo of the files in a models folder, the one-sentence error for a file that is not there (at /prompt and
at run time), the fingerprint that re-runs the node when the file changes on disk, and the full path."""
from __future__ import annotations

from comfy_api.latest import io

from . import paths


class ModelFile:
    """``input_name``: the combo's input; ``folder``: the folder_paths name; ``what`` names the file in messages
    ("Adapter"); ``hint`` says what to do when it is missing."""

    def __init__(self, input_name: str, folder: str, what: str, hint: str):
        self.input_name, self.folder, self.what, self.hint = input_name, folder, what, hint

    def combo(self, tooltip: str) -> io.Combo.Input:
        import folder_paths

        return io.Combo.Input(self.input_name, options=folder_paths.get_filename_list(self.folder), tooltip=tooltip)

    def combo_error(self, name: str, value) -> str | None:
        """The node's ``combo_error`` (see validation.combo_check): a missing file, named with the folders searched."""
        if name != self.input_name:
            return None
        return paths.missing_file_message(self.folder, value, self.what, self.hint)

    def fingerprint(self, value, *extra):
        return paths.file_fingerprint(self.folder, value, *extra)

    def path(self, value) -> str:
        """The picked file's full path, or one clear error naming the folders searched."""
        return paths.resolve_file(self.folder, value, self.what, self.hint)
