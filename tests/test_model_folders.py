"""The pack's model folders through ComfyUI's folder_paths, as an extra_model_paths.yaml user gets them (needs ComfyUI).

Protects: a ``dreamcache:`` (or ``dreamcache_caches:`` / ``sams:``) folder declared in extra_model_paths.yaml, which
ComfyUI registers before loading custom nodes with an empty extension filter ("every file"), lists model files
only once the pack has registered its folders: notes.txt and readme.md never reach DreamCache Loader's list; a
filter another pack set stays and gets ours added.
"""
from __future__ import annotations

import pytest

FOLDERS = {"dreamcache": {".safetensors", ".pt"}, "dreamcache_caches": {".safetensors"}, "sams": {".pth"}}


@pytest.fixture
def saved_folders(pack):
    import folder_paths

    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items() if k in FOLDERS}
    yield folder_paths
    for k in FOLDERS:
        folder_paths.folder_names_and_paths.pop(k, None)
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()


def load_extra_path_config(comfy, yaml_path):
    """ComfyUI's own reader of extra_model_paths.yaml (utils/extra_config.py; loaded from its file because another
    top-level ``utils`` module may already be imported)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("comfy_extra_config", comfy / "utils" / "extra_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.load_extra_path_config(str(yaml_path))


def test_a_folder_from_extra_model_paths_lists_model_files_only(comfy, pack, saved_folders, tmp_path):
    folder_paths = saved_folders
    for name in FOLDERS:
        folder = tmp_path / "elsewhere" / name
        folder.mkdir(parents=True)
        for f in ("notes.txt", "readme.md", "preview.png", "model.safetensors", "model.pt", "sam.pth"):
            (folder / f).write_bytes(b"x")
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text("mine:\n  base_path: " + str(tmp_path / "elsewhere") + "\n"
                    + "".join(f"  {name}: {name}/\n" for name in FOLDERS))
    # as ComfyUI's main.py does: the yaml first (the folders are new to folder_paths), then the custom nodes
    for name in FOLDERS:
        folder_paths.folder_names_and_paths.pop(name, None)
    folder_paths.filename_list_cache.clear()
    load_extra_path_config(comfy, yaml)
    assert folder_paths.folder_names_and_paths["dreamcache"][1] == set()  # ComfyUI's own default: no filter
    assert "notes.txt" in folder_paths.get_filename_list("dreamcache")  # the bug this protects against
    folder_paths.filename_list_cache.clear()
    pack.nodes.paths.register_folders()
    for name, expected in FOLDERS.items():
        listed = set(folder_paths.get_filename_list(name))
        assert not listed & {"notes.txt", "readme.md", "preview.png"}, (name, listed)
        assert expected <= {"." + f.rsplit(".", 1)[1] for f in listed}, (name, listed)
        assert str(tmp_path / "elsewhere" / name) in folder_paths.get_folder_paths(name)
    assert "model.pt" in folder_paths.get_filename_list("dreamcache")
    # caches are safetensors only (other tests may have registered more folders: only this test's files count)
    ours = {"notes.txt", "readme.md", "preview.png", "model.safetensors", "model.pt", "sam.pth"}
    assert set(folder_paths.get_filename_list("dreamcache_caches")) & ours == {"model.safetensors"}


def test_a_filter_another_pack_set_is_kept_and_extended(pack, saved_folders):
    folder_paths = saved_folders
    folder_paths.folder_names_and_paths["sams"] = (["/other/pack/sams"], {".onnx"})
    pack.nodes.paths.register_folders()
    paths, exts = folder_paths.folder_names_and_paths["sams"]
    assert paths[0] == "/other/pack/sams" and {".onnx", ".pth", ".safetensors"} <= exts
