"""The rule router: explicit agent, keyword and pattern hints, default agent."""

from __future__ import annotations

import pytest

from orion_fsm import Registry, RegistryError, RuleRouter

pytestmark = pytest.mark.anyio


@pytest.fixture
def router() -> RuleRouter:
    return RuleRouter(Registry.load())


async def test_explicit_agent_wins(router: RuleRouter) -> None:
    decision = await router.route("write a python function", requested="logic")
    assert (decision.agent, decision.source) == ("logic", "explicit")


async def test_unknown_explicit_agent_names_the_known_ones(router: RuleRouter) -> None:
    with pytest.raises(RegistryError, match="conversation"):
        await router.route("hi", requested="wizard")


@pytest.mark.parametrize(
    ("text", "agent"),
    [
        ("Write a Python function that reverses a string", "code"),
        ("Écris une fonction Python qui trie une liste", "code"),
        ("Traceback (most recent call last): TypeError", "code"),
        ("Prove that the square root of 2 is irrational", "logic"),
        ("Tell me about your weekend", "conversation"),
    ],
)
async def test_rules_pick_the_agent_whose_hints_match(
    router: RuleRouter, text: str, agent: str
) -> None:
    assert (await router.route(text, requested=None)).agent == agent


async def test_nothing_matching_goes_to_the_default_agent(router: RuleRouter) -> None:
    decision = await router.route("zzz qqq", requested=None)
    assert (decision.agent, decision.source) == ("conversation", "default")


async def test_decision_reports_runner_up_and_margin(router: RuleRouter) -> None:
    decision = await router.route("write a python function with a loop", requested=None)
    assert decision.source == "rules" and decision.agent == "code"
    assert decision.runner_up is not None and decision.margin > 0
    assert decision.matched
