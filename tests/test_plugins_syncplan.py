"""The sync plan: desired configs vs what runs -> actions (pure)."""

import pytest

from elkeid_agent.pb import grpc_pb2
from elkeid_agent.plugins.syncplan import (KEEP, MAX_NAME_LEN, REJECT, REMOVE, REPLACE, REVIVE,
    START, PluginSpec, check_name, plan_sync)


def spec(name, version="1", **kw):
    return PluginSpec(name=name, version=version, **kw)


def kinds(actions):
    return [(a.kind, a.name) for a in actions]


@pytest.mark.parametrize("name", ["collector", "journal_watcher", "a", "A-9_z",
                                  "x" * MAX_NAME_LEN])
def test_good_names(name):
    assert check_name(name) is None


@pytest.mark.parametrize("name,why", [
    ("", "empty"),
    ("a/b", "characters"),
    ("/etc", "characters"),
    ("..", "characters"),
    ("../escape", "characters"),
    (".", "characters"),
    ("a b", "characters"),
    ("naïve", "characters"),
    ("x" * (MAX_NAME_LEN + 1), "longer"),
    ("elkeid-agent", "reserved"),
])
def test_bad_names(name, why):
    assert why in check_name(name)


def test_start_keep_replace_remove():
    running = {"collector": ("1", False), "driver": ("1", False), "old": ("3", False)}
    desired = [spec("collector", "1"), spec("driver", "2"), spec("scanner", "1")]
    actions = plan_sync(desired, running)
    assert kinds(actions) == [(REMOVE, "old"), (KEEP, "collector"), (REPLACE, "driver"),
                              (START, "scanner")]
    replace = actions[2]
    assert replace.spec.version == "2" and "'1' -> '2'" in replace.reason


def test_empty_list_removes_everything():
    actions = plan_sync([], {"b": ("1", False), "a": ("1", True)})
    assert kinds(actions) == [(REMOVE, "a"), (REMOVE, "b")]


def test_fatal_same_version_is_revived_other_version_replaced():
    running = {"a": ("1", True), "b": ("1", True)}
    actions = plan_sync([spec("a", "1"), spec("b", "2")], running)
    assert kinds(actions) == [(REVIVE, "a"), (REPLACE, "b")]


def test_rejects_come_first_and_bad_names_are_not_removed_or_started():
    running = {"good": ("1", False)}
    actions = plan_sync([spec("../x"), spec("good"), spec("")], running)
    assert kinds(actions) == [(REJECT, "../x"), (REJECT, ""), (KEEP, "good")]


def test_bad_name_never_matches_a_running_plugin():
    # A rejected entry does not count as "listed": the running plugin it
    # might have meant is still removed.
    actions = plan_sync([spec("a/b")], {"a": ("1", False)})
    assert kinds(actions) == [(REJECT, "a/b"), (REMOVE, "a")]


def test_duplicate_names_last_wins():
    actions = plan_sync([spec("a", "1", detail="first"), spec("b"), spec("a", "2", detail="last")],
                        {})
    assert kinds(actions) == [(REJECT, "a"), (START, "b"), (START, "a")]
    assert actions[0].spec.detail == "first" and "more than once" in actions[0].reason
    assert actions[2].spec.detail == "last"


def test_same_version_keeps_even_if_detail_changed():
    # Elkeid compares versions only.
    actions = plan_sync([spec("a", "1", detail="new")], {"a": ("1", False)})
    assert kinds(actions) == [(KEEP, "a")]


def test_spec_from_config_and_local_hash():
    cfg = grpc_pb2.Config(name="c", type="tar.gz", version="1.2", sha256="AB" * 32,
                          signature="", download_urls=["http://x/1", "http://x/2"], detail="d")
    s = PluginSpec.from_config(cfg)
    assert s.urls == ("http://x/1", "http://x/2") and s.is_archive and s.detail == "d"
    assert s.local_hash == "ab" * 32  # falls back to sha256, lower-cased
    s2 = PluginSpec.from_config(grpc_pb2.Config(name="c", sha256="aa" * 32, signature="BB" * 32))
    assert s2.local_hash == "bb" * 32 and not s2.is_archive
