"""The app's state: Starlette's `State` behaviour, its values found by plain attribute lookup."""

from __future__ import annotations

import pytest
from starlette.datastructures import State

from service.app import AppState, create_app
from service.config import Settings


def test_values_set_either_way_read_back_either_way_and_go_when_deleted() -> None:
    state = AppState()
    state.registry = "models"
    state["limits"] = "limits"
    assert isinstance(state, State)
    assert (state.registry, state["registry"], state.limits, state["limits"]) == ("models", "models", "limits",
                                                                                 "limits")
    assert vars(state)["registry"] == "models"  # found without Starlette's __getattr__
    state.registry = "other"
    assert state.registry == state["registry"] == "other"
    del state.registry
    del state["limits"]
    assert getattr(state, "registry", None) is None and getattr(state, "limits", None) is None
    with pytest.raises(AttributeError):
        _ = state.registry
    with pytest.raises(KeyError):
        _ = state["limits"]


def test_the_app_keeps_its_state_there() -> None:
    app = create_app(Settings(log_level="warning"))
    assert isinstance(app.state, AppState)
    assert vars(app.state)["limits"] is app.state.limits and vars(app.state)["executor"] is app.state.executor
    app.state.executor.shutdown()
