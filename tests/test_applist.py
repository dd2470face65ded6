"""``list --apps``'s answer (sessiond.applist): who sees which apps, and the
bounds that keep a hostile app's declarations from breaking the listing."""

from __future__ import annotations

import functools
import json
from typing import Any

from sessiond.applist import AppListLimits, describe_apps
from sessiond.model import App
from tracewire import ctf
from tracewire.control import MAX_CONTROL_MESSAGE


def app(app_id: int, pid: int, uid: int, tps: list[ctf.EventDecl], procname: str = "demo") -> App:
    a = App(app_id, pid, uid, procname, link=None, started="20261202T180000")  # type: ignore[arg-type]
    a.tracepoints = tps
    return a


TICK = ctf.EventDecl("demo:tick", 0, (("seq", ctf.FieldType.INT), ("msg", ctf.FieldType.STR)))


@functools.cache
def _hostile_declarations() -> tuple[ctf.EventDecl, ...]:
    fields = tuple((f"f{'x' * 200}{k}", ctf.FieldType.BYTES) for k in range(4))
    return tuple(ctf.EventDecl(f"evil:{'e' * 240}{i:05d}", i, fields) for i in range(4096))


def hostile(app_id: int, pid: int, uid: int) -> App:
    """The most sessiond takes from one app: 4096 tracepoints of 255-character
    names, each with fields of long names (the declarations are made once)."""
    return app(app_id, pid, uid, list(_hostile_declarations()), procname="évil" * 60)


def size(answer: dict[str, Any]) -> int:
    return len(json.dumps(answer, separators=(",", ":")).encode())


def test_fields_and_types_as_a_user_writes_patterns_from_them() -> None:
    out = describe_apps([app(1, 42, 1000, [TICK])], uid=1000)
    assert out == {"apps_omitted": 0, "apps": [{
        "pid": 42, "uid": 1000, "procname": "demo", "registered": "20261202T180000", "tracepoints_omitted": 0,
        "tracepoints": [{"name": "demo:tick", "fields": [{"name": "seq", "type": "int64"},
                                                          {"name": "msg", "type": "string"}]}],
    }]}


def test_a_user_sees_only_their_apps_and_root_sees_all() -> None:
    apps = [app(1, 30, 1001, [TICK]), app(2, 20, 1000, []), app(3, 10, 0, [TICK])]
    assert [a["pid"] for a in describe_apps(apps, uid=1000)["apps"]] == [20]
    assert [a["pid"] for a in describe_apps(apps, uid=1002)["apps"]] == []
    assert [(a["uid"], a["pid"]) for a in describe_apps(apps, uid=0)["apps"]] == [(0, 10), (1000, 20), (1001, 30)]


def test_hostile_apps_cannot_crowd_out_the_others_nor_overflow_the_frame() -> None:
    apps = [hostile(i, 100 + i, 1000) for i in range(12)] + [app(99, 5, 1001, [TICK])]
    out = describe_apps(apps, uid=0)
    assert size(out) < AppListLimits().total_bytes < MAX_CONTROL_MESSAGE
    normal = next(a for a in out["apps"] if a["pid"] == 5)
    assert normal["tracepoints"][0]["name"] == "demo:tick" and normal["tracepoints_omitted"] == 0
    evil = [a for a in out["apps"] if a["uid"] == 1000]
    assert len(evil) == 12
    for a in evil:  # each keeps a share, in declaration order, and says what is left out
        assert a["tracepoints"] and a["tracepoints_omitted"] > 0
        assert len(a["tracepoints"]) + a["tracepoints_omitted"] == 4096
        assert a["tracepoints"][0]["name"].endswith("00000")


def test_many_apps_are_counted_beyond_the_limit() -> None:
    apps = [app(i, i, 1000, [TICK]) for i in range(50)]
    out = describe_apps(apps, uid=1000, limits=AppListLimits(max_apps=20))
    assert len(out["apps"]) == 20 and out["apps_omitted"] == 30
    tiny = describe_apps(apps, uid=1000, limits=AppListLimits(total_bytes=1000))
    assert len(tiny["apps"]) == 50  # pid, name and user are always there
    assert all(a["tracepoints_omitted"] == 1 for a in tiny["apps"])
