"""Outcomes: what experts did on queries (logged live, fed back, or imported) and tables of them."""

from concilium.outcomes.store import Labelled, Logged, OutcomeStore
from concilium.outcomes.table import OutcomeTable

__all__ = ["Labelled", "Logged", "OutcomeStore", "OutcomeTable"]
