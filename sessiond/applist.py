"""``list --apps``: the registered apps and what each has declared, bounded.

Theory of operation
-------------------
What an app declares is its own input: a hostile app may declare the most
tracepoints sessiond takes (``max_tracepoints_per_app``), each with a long
name and many fields, and a root user may see thousands of apps.  The answer
must still fit one control frame (4 MiB, which the CLI refuses beyond) and
one app must never crowd out the others.  So the answer has a budget of
bytes (an upper estimate of each entry's JSON size, names counted as if
every character were escaped), shared out by *water-filling*: the apps are
taken from the one that needs least to the one that needs most, and each
gets what it needs or an equal share of what is left, whichever is less.
An app whose declarations do not fit its share is listed with the
tracepoints that do (in declaration order) and the count of those left out;
an app never loses its pid, name and user.  At most ``max_apps`` apps are
listed (the rest are counted).

Pure functions over the registry's :class:`~sessiond.model.App` objects: no
I/O, no await (the answer is taken in one step, as the apps stand).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sessiond.model import App
from tracewire import ctf

__all__ = ["AppListLimits", "describe_apps", "FIELD_TYPE_NAMES"]

# How ``list --apps`` names a field's type: the CTF type it is written as.
FIELD_TYPE_NAMES = {
    ctf.FieldType.INT: "int64",
    ctf.FieldType.FLOAT: "double",
    ctf.FieldType.STR: "string",
    ctf.FieldType.BYTES: "bytes",
}
_ESCAPED = 6  # bytes one character may take in JSON ("\\u00e9")
_ENTRY = 96  # keys, punctuation and numbers of one app entry
_TRACEPOINT = 32  # of one tracepoint entry
_FIELD = 32  # of one field entry, besides its name


@dataclass(frozen=True, slots=True)
class AppListLimits:
    """The bounds of one answer (the defaults keep it well below the 4 MiB
    control frame)."""

    total_bytes: int = 2 * 1024 * 1024
    max_apps: int = 4096


def _tracepoint_cost(decl: ctf.EventDecl) -> int:
    return _TRACEPOINT + _ESCAPED * len(decl.name) + sum(_FIELD + _ESCAPED * len(n) for n, _t in decl.fields)


def _app_cost(app: App) -> int:
    return _ENTRY + _ESCAPED * len(app.procname)


def _tracepoint(decl: ctf.EventDecl) -> dict[str, Any]:
    return {"name": decl.name,
            "fields": [{"name": n, "type": FIELD_TYPE_NAMES[t]} for n, t in decl.fields]}


def _shares(needs: list[int], budget: int) -> list[int]:
    """Water-filling: each need gets itself, or an equal share of what is
    left once every smaller need is served, whichever is less."""
    out = [0] * len(needs)
    left = budget
    order = sorted(range(len(needs)), key=needs.__getitem__)
    for rank, i in enumerate(order):
        share = left // (len(needs) - rank)
        out[i] = min(needs[i], share)
        left -= out[i]
    return out


def describe_apps(apps: Iterable[App], uid: int, limits: AppListLimits = AppListLimits()) -> dict[str, Any]:
    """The answer to ``list --apps`` for user ``uid`` (root: every app;
    anyone else: their own).

    Returns:
        ``{"apps": [...], "apps_omitted": N}``; each app is ``{"pid",
        "uid", "procname", "registered", "tracepoints": [{"name",
        "fields": [{"name", "type"}]}], "tracepoints_omitted"}``, ordered by
        uid then pid.
    """
    visible = sorted((a for a in apps if uid == 0 or a.uid == uid), key=lambda a: (a.uid, a.pid, a.id))
    listed, omitted = visible[: limits.max_apps], max(0, len(visible) - limits.max_apps)
    fixed = sum(_app_cost(a) for a in listed)
    costs = [[_tracepoint_cost(d) for d in a.tracepoints] for a in listed]
    shares = _shares([sum(c) for c in costs], max(0, limits.total_bytes - fixed))
    out = []
    for app, cost, share in zip(listed, costs, shares, strict=True):
        tps = []
        spent = 0
        for decl, c in zip(app.tracepoints, cost, strict=True):
            if spent + c > share:
                break
            tps.append(_tracepoint(decl))
            spent += c
        out.append({
            "pid": app.pid,
            "uid": app.uid,
            "procname": app.procname,
            "registered": app.started,
            "tracepoints": tps,
            "tracepoints_omitted": len(app.tracepoints) - len(tps),
        })
    return {"apps": out, "apps_omitted": omitted}
