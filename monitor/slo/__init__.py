"""SLOs: ledgers, error budgets and burn events, and the rules and dashboard made from them."""

from .book import SloBook, SloLedger, SloMetrics
from .dashboard import build_dashboard, panel_queries, render_dashboard
from .rules import TIERS, build_rules, render_rules

__all__ = [
    "TIERS",
    "SloBook",
    "SloLedger",
    "SloMetrics",
    "build_dashboard",
    "build_rules",
    "panel_queries",
    "render_dashboard",
    "render_rules",
]
