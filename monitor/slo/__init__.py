"""SLOs: ledgers, error budgets and burn events, and the rules and dashboard made from them."""

from .abc import SloMinuteStore
from .book import SloBook
from .dashboard import build_dashboard, panel_queries, render_dashboard
from .ledger import WINDOWS, SloLedger
from .metrics import SloMetrics
from .rules import build_rules, render_rules
from .stores.sqlite import SqliteSloMinuteStore
from .tiers import SEVERITIES, TIERS, Severity
from .workflows import WorkflowSlos

__all__ = [
    "SEVERITIES",
    "TIERS",
    "WINDOWS",
    "Severity",
    "SloBook",
    "SloLedger",
    "SloMetrics",
    "SloMinuteStore",
    "SqliteSloMinuteStore",
    "WorkflowSlos",
    "build_dashboard",
    "build_rules",
    "panel_queries",
    "render_dashboard",
    "render_rules",
]
