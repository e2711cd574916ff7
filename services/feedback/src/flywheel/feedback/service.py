"""The feedback domain, as one object the transport layers hold.

Its parts each own one kind of record: :class:`Accounts` (tenants, users, keys, task types),
:class:`Generations`, :class:`FeedbackRecords` and :class:`Reports` (stats, exports). Every
part scopes every query to the tenant it acts for, and commits rows and their outbox
events in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable

from flywheel.core.db import SessionFactory
from flywheel.core.paging import Page
from flywheel.feedback.accounts import Accounts
from flywheel.feedback.feedback_records import FeedbackInput, FeedbackRecords
from flywheel.feedback.generations import Generations
from flywheel.feedback.reports import Reports

__all__ = ["FeedbackInput", "FeedbackService", "Page"]


class FeedbackService:
    """The feedback domain's parts over one database."""

    def __init__(
        self,
        sessions: SessionFactory,
        *,
        key_pepper: bytes,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.accounts = Accounts(sessions, key_pepper=key_pepper, on_commit=on_commit)
        self.generations = Generations(sessions, on_commit=on_commit)
        self.feedback = FeedbackRecords(sessions, on_commit=on_commit)
        self.reports = Reports(sessions, on_commit=on_commit)
