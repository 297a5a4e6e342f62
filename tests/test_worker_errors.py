"""Exceptions raised in worker processes (rebuild, verify) reach the parent pickled: every one must unpickle
with its message and attributes, or the parent's result thread dies and the parent waits forever."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
from decimal import Decimal

import pytest

import projections
import sle_events
from sle_events.picklable import Picklable


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for package in (sle_events, projections):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".cli" in info.name:
                continue
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                    found.append(cls)
    return found


def _needs_more_than_a_message(cls: type[BaseException]) -> bool:
    init = cls.__init__
    if not inspect.isfunction(init):  # BaseException's own: cls(*args) rebuilds it
        return False
    params = list(inspect.signature(init).parameters.values())[1:]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = [p for p in params if p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
    return len(positional) != 1 or bool(keyword)


def test_every_exception_with_its_own_arguments_survives_pickling():
    classes = _exception_classes()
    assert len(classes) > 20, "the walk found the project's exceptions"
    unsafe = [
        f"{c.__module__}.{c.__qualname__}"
        for c in classes
        if _needs_more_than_a_message(c) and not issubclass(c, Picklable)
    ]
    assert unsafe == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: __import__("projections.base", fromlist=["x"]).ProjectionHalted(12, "s-1", 3, "hash chain broken"),
        lambda: __import__("projections.base", fromlist=["x"]).StreamHalted(12, "s-1", 3, "payload does not load"),
        lambda: __import__("sle_events.store.errors", fromlist=["x"]).UnknownStudy("no study", stream="s-2", version=1),
        lambda: __import__("sle_events.domain.errors", fromlist=["x"]).InvalidQuantity("value", "x", "not a number"),
        lambda: __import__("sle_events.domain.errors", fromlist=["x"]).ImplausibleValue(
            "CREAT", Decimal("99"), (Decimal("0"), Decimal("20")), "mg/dL"
        ),
        lambda: __import__("sle_events.signing.canonical", fromlist=["x"]).NotCanonicalisable("payload.value", "NaN"),
    ],
    ids=[
        "ProjectionHalted",
        "StreamHalted",
        "UnknownStudy",
        "InvalidQuantity",
        "ImplausibleValue",
        "NotCanonicalisable",
    ],
)
def test_a_worker_error_arrives_whole(make):
    sent = make()
    received = pickle.loads(pickle.dumps(sent))
    assert type(received) is type(sent)
    assert str(received) == str(sent) and received.args == sent.args
    assert vars(received) == vars(sent)
