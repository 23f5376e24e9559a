"""Dispatch: plans (who goes to which row), gathers (moving activations), and the
dispatchers that compose them, chosen by name."""
from moe_jax.dispatch.dispatchers import (DISPATCHERS, Dispatcher, ExpertRows, Fused, Sorted,
                                          get)
from moe_jax.dispatch.gathers import row_values, rows_to_tokens, tokens_to_rows
from moe_jax.dispatch.plan import PLAN_MODES, DispatchPlan, expert_capacity, make_plan

__all__ = ["DISPATCHERS", "DispatchPlan", "Dispatcher", "ExpertRows", "Fused", "PLAN_MODES", "Sorted",
           "expert_capacity", "get", "make_plan", "row_values", "rows_to_tokens",
           "tokens_to_rows"]
