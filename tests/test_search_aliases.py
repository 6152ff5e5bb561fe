"""Search aliases (needs ComfyUI): artists find the nodes by the words they use.

Protects: on a ComfyUI whose schemas carry ``search_aliases`` (0.33.0), /object_info gives every DreamCache node its
aliases from the one table in nodes/search_aliases.py, and the main nodes answer to "personalize", "subject",
"reference" and "IP adapter alternative" (the frontend searches aliases with the node's name); on one without them
(0.3.64) the nodes load unchanged. The table names exactly the pack's nodes, so a new node cannot be forgotten.
"""
from __future__ import annotations

import pytest

ARTIST_WORDS = ("personalize", "subject", "reference", "IP adapter alternative")
MAIN_NODES = ("DreamCacheApply", "DreamCacheApplyAdvanced", "DreamCacheBuildFeatureCache")


@pytest.fixture(scope="module")
def aliases(pack):
    return pack.nodes.search_aliases


def node_info(node_id):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()


def test_the_table_names_every_node_of_the_pack(pack, aliases):
    ours = {n.GET_SCHEMA().node_id for n in pack.nodes.NODES}
    assert set(aliases.SEARCH_ALIASES) == ours
    for node_id in MAIN_NODES:
        text = " ".join(aliases.SEARCH_ALIASES[node_id]).lower()
        for word in ARTIST_WORDS:
            assert word.lower() in text, (node_id, word)


def test_object_info_carries_the_aliases_where_comfyui_supports_them(pack, aliases, comfy):
    from dreamcache.comfy.env import comfyui_version

    version = comfyui_version(comfy)
    if version in ("0.3.64", "0.33.0"):  # the releases CI tests: 0.3.64's io.Schema has no search_aliases
        assert aliases.supported() == (version == "0.33.0")
    for node_id, expected in aliases.SEARCH_ALIASES.items():
        info = node_info(node_id)
        if aliases.supported():
            assert info["search_aliases"] == expected, node_id
        else:
            assert not info.get("search_aliases"), node_id
        assert info["description"] and info["category"].startswith("DreamCache")


def test_a_nodes_own_aliases_are_kept_and_wrapping_twice_adds_nothing(pack, aliases):
    if not aliases.supported():
        pytest.skip("this ComfyUI's io.Schema has no search_aliases (0.3.64); the nodes are left unchanged there")
    from comfy_api.latest import io

    class DreamCacheApply(io.ComfyNode):  # a stand-in with the id of a node in the table
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="DreamCacheApply", category="DreamCache/test", search_aliases=["mine"],
                             inputs=[], outputs=[])

    wrapped = aliases.with_search_aliases(aliases.with_search_aliases(DreamCacheApply))
    got = wrapped.define_schema().search_aliases
    assert got == ["mine"] + aliases.SEARCH_ALIASES["DreamCacheApply"]
