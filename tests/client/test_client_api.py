"""`AsyncClient` mirrors `Client`: the same public methods with the same parameters, async."""

from __future__ import annotations

import inspect

import pytest

from rudder.client import AsyncClient, Client


def _public_methods(cls: type) -> dict[str, object]:
    return {name: fn for name, fn in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def test_async_client_has_every_public_method_of_client_and_no_other():
    assert sorted(_public_methods(AsyncClient)) == sorted(_public_methods(Client))


@pytest.mark.parametrize("name", sorted(_public_methods(Client)))
def test_each_method_takes_the_same_parameters_and_is_async(name):
    sync, async_ = getattr(Client, name), getattr(AsyncClient, name)
    assert list(inspect.signature(async_).parameters.values()) == list(inspect.signature(sync).parameters.values())
    assert not (inspect.iscoroutinefunction(sync) or inspect.isasyncgenfunction(sync))
    # a stream stays a stream: Client's generators are async generators on AsyncClient
    assert (inspect.isasyncgenfunction(async_) if inspect.isgeneratorfunction(sync)
            else inspect.iscoroutinefunction(async_))


def test_constructors_take_the_same_parameters():
    assert inspect.signature(AsyncClient.__init__) == inspect.signature(Client.__init__)
